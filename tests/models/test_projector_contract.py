"""The projector contract (models/projectors/base.py): every option of configs/model/{vision,audio} implements it,
a design a user writes in a few lines works in FusionModel, and what breaks the contract fails at construction."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from gemma_fusion import FusionModel
from gemma_fusion.core.config import CONFIG_DIR
from gemma_fusion.core.errors import UserError
from gemma_fusion.data.collate import collate
from gemma_fusion.data.sequence import build_sequence
from gemma_fusion.models.projectors import AudioProjector, HFVisionProjector, VisionProjector
from gemma_fusion.models.projectors.build import build_projector
from gemma_fusion.models.trainable import set_trainable
from gemma_fusion.training.fsdp import auto_wrap_policy
from tests.conftest import save_tiny_siglip
from tests.models.test_audio_designs import tiny_whisper

OUT = 32
# what a Gemma 4 checkpoint says of its embedders (backbone.py: spec.vision / spec.audio), filling `null`s
VISION_GEOMETRY = dict(patch_size=4, pooling_kernel_size=2, embed_dim=16, posemb_size=16, eps=1e-6)
AUDIO_GEOMETRY = dict(frame_dim=320, eps=1e-6)
NATIVE = {"patch_ef", "audio_frames"}  # Gemma 4's own embed_vision / embed_audio


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / "model" / group).glob("*.yaml") if p.stem != "none")


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """Local tiny towers for the options that need one: a SigLIP (4 px patches) and a Whisper."""
    siglip = save_tiny_siglip(tmp_path_factory.mktemp("siglip"), patch_size=4, image_size=16)
    whisper = tmp_path_factory.mktemp("whisper")
    tiny_whisper(whisper)
    return {"hf_vision": siglip, "hf_audio": whisper}


def build_option(group: str, name: str, towers) -> nn.Module:
    """The projector `model/<group>=<name>` builds, composed from the real train.yaml, on the tiny geometry."""
    overrides = [f"model/{group}={name}"] + ([f"model.{group}.path={towers[name]}"] if name in towers else [])
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        node = compose("train", overrides=overrides).model[group]
    torch.manual_seed(0)
    return build_projector(node, OUT, VISION_GEOMETRY if group == "vision" else AUDIO_GEOMETRY, None, group)


@pytest.mark.parametrize("name", options("vision"))
def test_every_vision_option_implements_the_contract(name, towers):
    proj = build_option("vision", name, towers).eval()
    assert isinstance(proj, VisionProjector) and proj.out_dim == OUT
    assert proj.patch_dim == (proj.patch_size * proj.pooling_kernel_size) ** 2 * 3
    assert proj.gemma4_native == (name in NATIVE)
    with torch.no_grad():
        assert proj.soft_tokens(*proj.idle_inputs("cpu")).shape == (1, 1, OUT)
        grid = torch.tensor([[(x, y) for y in range(2) for x in range(3)]] * 2)  # two 3 x 2 images
        assert proj.soft_tokens(torch.rand(2, 6, proj.patch_dim), grid).shape == (2, 6, OUT)


@pytest.mark.parametrize("name", options("audio"))
def test_every_audio_option_implements_the_contract(name, towers):
    proj = build_option("audio", name, towers).eval()
    assert isinstance(proj, AudioProjector) and proj.out_dim == OUT and proj.frame_dim == AUDIO_GEOMETRY["frame_dim"]
    assert proj.gemma4_native == (name in NATIVE)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    with torch.no_grad():
        assert proj.soft_tokens(*proj.idle_inputs("cpu")).shape == (1, 1, OUT)
        assert proj.soft_tokens(torch.randn(2, 5, proj.frame_dim) * 0.1, mask).shape == (2, 5, OUT)


def test_every_option_is_covered():
    assert {"patch_ef", "linear", "mlp2x_gelu", "conv_stem", "pixel_shuffle", "vit", "hf_vision"} <= set(
        options("vision"))
    assert {"audio_frames", "frame_stack_mlp", "conv1d", "mel_conformer", "hf_audio"} <= set(options("audio"))


class MeanColour(VisionProjector):
    """A user's design in a few lines: each merged patch's mean RGB -> Linear."""

    def __init__(self, out_dim: int, patch_size: int = 4, pooling_kernel_size: int = 2):
        super().__init__(out_dim, patch_size, pooling_kernel_size)
        self.proj = nn.Linear(3, out_dim)

    def forward(self, pixel_values, position_ids):
        return self.proj(pixel_values.unflatten(-1, (-1, 3)).mean(-2))  # N, P, patch_dim -> N, P, 3 -> N, P, out_dim


class ClipMean(AudioProjector):
    """A user's audio design that looks across frames: each frame plus the mean of its clip's real frames."""

    uses_mask = True

    def __init__(self, out_dim: int, frame_dim: int = 320):
        super().__init__(out_dim, frame_dim)
        self.proj = nn.Linear(frame_dim, out_dim)

    def forward(self, frames, mask):
        real = frames * mask[..., None]
        clip = real.sum(1, keepdim=True) / mask.sum(1, keepdim=True)[..., None].clamp(min=1)  # N, 1, frame_dim
        return self.proj(frames + clip)


def fusion_batch(model, n: int = 2):
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(n):
        seq = build_sequence(model.tokenizer, model.tokens, "Read:", f"{i}", [3], [4 + i])
        samples.append(dict(input_ids=seq.input_ids, labels=seq.labels, mm_token_type_ids=seq.mm_token_type_ids,
                            images=[(torch.rand(3, model.vision.patch_dim, generator=g),
                                     torch.tensor([(x, 0) for x in range(3)]))],
                            audio=[torch.randn(4 + i, model.audio.frame_dim, generator=g) * 0.1],
                            key=str(i), task="t", prompt="Read:", target=f"{i}"))
    batch = collate(samples, model.tokens.pad)
    batch.pop("meta")
    return batch


def test_user_designs_train_in_the_fusion_model(tiny_gemma4_dir):
    """tiny_gemma4_dir: 4 px patches merged 3 x 3, 320-sample frames, hidden 64."""
    base = FusionModel.from_pretrained(tiny_gemma4_dir)
    hidden = base.backbone.hidden_size
    model = FusionModel(base.backbone, base.tokens, MeanColour(hidden, 4, 3), ClipMean(hidden, 320),
                        tokenizer=base.tokenizer)
    set_trainable(model)
    loss = model(**fusion_batch(model)).loss
    loss.backward()
    assert torch.isfinite(loss) and model.vision.proj.weight.grad.abs().sum() > 0
    assert model.audio.proj.weight.grad.abs().sum() > 0


def test_the_fusion_model_refuses_a_projector_without_the_contract(tiny_gemma4_dir):
    base = FusionModel.from_pretrained(tiny_gemma4_dir)
    plain = nn.Linear(base.vision.patch_dim, base.backbone.hidden_size)
    with pytest.raises(UserError, match="Linear does not implement the vision projector contract; subclass "
                                        "gemma_fusion.models.projectors.VisionProjector"):
        FusionModel(base.backbone, base.tokens, plain, None)
    with pytest.raises(UserError, match="MeanColour does not implement the audio projector contract"):
        FusionModel(base.backbone, base.tokens, None, MeanColour(base.backbone.hidden_size))


def test_breaking_the_contract_fails_at_construction():
    class NoForward(VisionProjector):
        def __init__(self):
            super().__init__(8, 4, 2)

    class NoGeometry(AudioProjector):
        def __init__(self):
            nn.Module.__init__(self)  # skips AudioProjector.__init__: no out_dim, no frame_dim

        def forward(self, frames):
            return frames

    class ShadowsAMember(MeanColour):
        def __init__(self):
            super().__init__(8)
            self.soft_tokens = nn.Identity()  # would hide the contract's soft_tokens

    with pytest.raises(TypeError, match="abstract method"):
        NoForward()
    with pytest.raises(UserError, match="NoGeometry has out_dim=None, not a positive integer"):
        NoGeometry()
    with pytest.raises(UserError, match="named soft_tokens, a member of the projector contract"):
        ShadowsAMember()
    with pytest.raises(UserError, match="MeanColour has patch_size=0, not a positive integer"):
        MeanColour(8, patch_size=0)


def test_the_audio_contract_passes_the_mask_only_to_designs_that_take_it():
    seen = []

    class FrameWise(AudioProjector):
        def __init__(self):
            super().__init__(4, 8)

        def forward(self, frames):
            return frames[..., :4]

    class Spy(ClipMean):
        def forward(self, frames, mask):
            seen.append(mask)
            return super().forward(frames, mask)

    frames, mask = torch.randn(2, 3, 8), torch.tensor([[True, True, False], [True, False, False]])
    assert FrameWise().soft_tokens(frames, mask).shape == (2, 3, 4)
    assert FrameWise()(frames, mask).shape == (2, 3, 4)  # the module call dispatches too (FusionModel, FSDP)
    Spy(4, 8).soft_tokens(frames, mask)
    Spy(4, 8).soft_tokens(frames)
    assert torch.equal(seen[0], mask) and seen[1].all() and seen[1].shape == (2, 3)


def test_frozen_modules_stay_frozen_in_eval_mode_and_get_their_own_fsdp_unit(towers):
    proj = HFVisionProjector(OUT, 4, 2, path=str(towers["hf_vision"])).train()
    assert proj.frozen_modules() == [proj.tower] and not proj.tower.training and proj.fc1.training
    for p in proj.parameters():
        p.requires_grad_(True)
    holder = nn.Module()
    holder.vision = proj
    set_trainable(holder)
    assert not any(p.requires_grad for p in proj.tower.parameters()) and proj.fc1.weight.requires_grad
    policy = auto_wrap_policy([])
    assert proj.tower in [m for m in holder.modules() if policy._lambda_fn(m)]
