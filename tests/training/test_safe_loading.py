"""Safe by default: a config names only allowed Python objects, and a checkpoint's own code runs only when the
user asks for it and has pinned it."""
from __future__ import annotations

import json
import pathlib
import sys
import textwrap

import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

from gemma_fusion.core.config import check_targets
from gemma_fusion.core.errors import UserError
from gemma_fusion.models.backbone import code_digest, is_remote_code, load_backbone
from gemma_fusion.models.build import build_model
from gemma_fusion.models.tokenizer import build_byte_tokenizer


@pytest.mark.parametrize("override, message", [
    ("model.vision._target_=os.system", "model.vision._target_=os.system is not allowed"),
    ("model.audio._target_=builtins.exec", "model.audio._target_=builtins.exec is not allowed"),
    ("model.vision._target_=torch.load", "model.vision._target_=torch.load is not allowed"),
    ("model.audio._target_=transformers.AutoModel.from_pretrained", "is not allowed"),
    ("+trainer.strategy._target_=subprocess.Popen", "trainer.strategy._target_=subprocess.Popen is not allowed"),
    ("model.vision._target_=torch.nn.NoSuchLayer", "model.vision._target_=torch.nn.NoSuchLayer is not allowed"),
    ("model.vision._target_=gemma_fusion.models.projectors.NoSuchLayer", "cannot be imported"),
    # what the object is decides, not how its path is spelt: a function or a class reached through an allowed module
    ("model.vision._target_=gemma_fusion.core.config.os.system", "it is a builtin_function_or_method, not a class"),
    ("model.audio._target_=torch.nn.Linear", "model.audio._target_=torch.nn.Linear is not allowed"),
    ("model.audio._target_=gemma_fusion.models.fusion.FusionModel", "it is gemma_fusion.models.fusion.FusionModel"),
    ("+trainer.strategy._target_=lightning.pytorch.strategies.SingleDeviceStrategy", "is not allowed"),
    ("+model.vision.extra._target_=gemma_fusion.models.projectors.PatchEmbedder",  # nested, though a projector
     "model.vision.extra._target_=gemma_fusion.models.projectors.PatchEmbedder is not allowed: a _target_ may only"),
])
def test_a_target_outside_the_allowlist_stops_training_before_anything_is_built(override, message, make_cfg,
                                                                                tmp_path):
    from gemma_fusion.training import recipe

    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        recipe.train(make_cfg(override), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_an_edited_run_config_cannot_make_the_model_builder_call_a_function(make_cfg):
    """build_model is what eval.py, infer and export run on a run directory's config.yaml."""
    cfg = make_cfg()
    cfg.model.audio._target_ = "os.system"
    with pytest.raises(UserError, match="not allowed"):
        build_model(cfg)
    cfg = make_cfg()  # nested inside a projector's arguments (build_model is reached without the whole-config check)
    OmegaConf.set_struct(cfg, False)
    cfg.model.vision.eps = {"_target_": "gemma_fusion.core.config.os.system", "_args_": ["true"]}
    with pytest.raises(UserError, match=r"model\.vision\.eps\._target_=.* is not allowed"):
        build_model(cfg)


def test_fsdp_layer_classes_are_checked_too():
    from gemma_fusion.training.fsdp import auto_wrap_policy

    with pytest.raises(UserError, match="layer_classes=os.system is not allowed"):
        auto_wrap_policy(["os.system"])
    for reached in ("transformers.models.llama.modeling_llama.torch.load",  # a function through transformers
                    "transformers.models.llama.modeling_llama.nn.Linear",  # a torch class through transformers
                    "transformers.AutoModel"):  # a class that is no torch.nn.Module
        with pytest.raises(UserError, match=f"layer_classes={reached} is not allowed"):
            auto_wrap_policy([reached])
    auto_wrap_policy(["transformers.models.llama.modeling_llama.LlamaDecoderLayer"])


def test_the_project_configs_pass_the_allowlist():
    from hydra import compose, initialize_config_dir

    from gemma_fusion.core.config import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for overrides in (["trainer=fsdp"], ["model/vision=vit", "model/audio=mel_conformer"],
                          ["model/vision=conv_stem", "model/audio=conv1d"]):
            check_targets(compose("train", overrides=overrides))


def test_a_users_own_package_is_allowed_through_the_environment(make_cfg, tmp_path, monkeypatch):
    package = tmp_path / "my_designs"
    package.mkdir()
    (package / "__init__.py").write_text(textwrap.dedent("""
        from gemma_fusion.models.projectors import AudioFrameProjector

        class MyAudio(AudioFrameProjector):
            pass
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = make_cfg("model/audio=audio_frames", "model.audio._target_=my_designs.MyAudio")  # its arguments
    with pytest.raises(UserError, match="GEMMA_FUSION_TARGETS=your_package"):
        build_model(cfg)
    monkeypatch.setenv("GEMMA_FUSION_TARGETS", "my_designs")
    assert type(build_model(cfg).audio).__name__ == "MyAudio"
    sys.modules.pop("my_designs", None)


class _Touch:
    """Unpickling this creates `path`."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (self.path,)


def test_a_checkpoint_holding_python_objects_is_refused_without_running_them(make_cfg, tmp_path):
    """Resuming from a planted or altered checkpoint: torch.load(weights_only=True) refuses the object."""
    from gemma_fusion.training import recipe

    marker, planted = tmp_path / "unpickled", tmp_path / "step-0000002.ckpt"
    torch.save({"global_step": 2, "state_dict": {}, "callbacks": _Touch(marker)}, planted)
    with pytest.raises(UserError, match="holds Python objects other than tensors and plain values"):
        recipe.train(make_cfg(f"resume={planted}", "trainer.max_steps=3"), tmp_path / "run")
    assert not marker.exists()


def test_a_backbone_with_pickled_weights_only_is_refused_unopened(tmp_path):
    """Weights load only from safetensors: a pickle-based pytorch_model.bin is never opened."""
    marker = tmp_path / "unpickled"
    model = LlamaForCausalLM(LlamaConfig(vocab_size=272, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2))
    model.save_pretrained(tmp_path / "llama")
    build_byte_tokenizer().save_pretrained(tmp_path / "llama")
    (tmp_path / "llama" / "model.safetensors").unlink()
    torch.save({**model.state_dict(), "payload": _Touch(marker)}, tmp_path / "llama" / "pytorch_model.bin")
    with pytest.raises(UserError, match="holds no \\*.safetensors weights"):
        load_backbone(tmp_path / "llama")
    assert not marker.exists()


# ---- a checkpoint that ships its own Python code (config.json auto_map)

@pytest.fixture
def remote_code_dir(tmp_path):
    """A tiny Llama whose config.json points at its own configuration/modeling files; both files write a marker
    when Python imports them, so the test sees whether any of the checkpoint's code ran."""
    path, marker = tmp_path / "custom_llama", tmp_path / "code_ran"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=2,
                                 eos_token_id=1)).save_pretrained(path)
    build_byte_tokenizer().save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="pinned_llama", architectures=["PinnedForCausalLM"],
                  auto_map={"AutoConfig": "configuration_pinned.PinnedConfig",
                            "AutoModelForCausalLM": "modeling_pinned.PinnedForCausalLM"})
    (path / "config.json").write_text(json.dumps(config))
    (path / "configuration_pinned.py").write_text(textwrap.dedent(f"""
        import pathlib
        from transformers import LlamaConfig

        pathlib.Path({str(marker)!r}).write_text("configuration ran")

        class PinnedConfig(LlamaConfig):
            model_type = "pinned_llama"
    """))
    (path / "modeling_pinned.py").write_text(textwrap.dedent(f"""
        import pathlib
        from transformers import LlamaForCausalLM
        from .configuration_pinned import PinnedConfig

        pathlib.Path({str(marker)!r}).write_text("modeling ran")

        class PinnedForCausalLM(LlamaForCausalLM):
            config_class = PinnedConfig
    """))
    return path, marker


def test_a_checkpoints_own_code_does_not_run_by_default(remote_code_dir):
    path, marker = remote_code_dir
    with pytest.raises(UserError, match="ships its own Python code.*backbone.trust_remote_code=true"):
        load_backbone(path)
    assert not marker.exists()


def test_trusting_remote_code_needs_a_pin_that_matches_the_files(remote_code_dir):
    path, marker = remote_code_dir
    digest = code_digest(path)
    with pytest.raises(UserError, match=f"pin them with backbone.revision={digest}"):
        load_backbone(path, trust_remote_code=True)
    with pytest.raises(UserError, match="are not the ones pinned by backbone.revision=sha256:0000"):
        load_backbone(path, trust_remote_code=True, revision="sha256:0000")
    assert not marker.exists()

    (path / "modeling_pinned.py").write_text((path / "modeling_pinned.py").read_text() + "\nEVIL = True\n")
    with pytest.raises(UserError, match=f"not the ones pinned.*they hash to {code_digest(path)}"):
        load_backbone(path, trust_remote_code=True, revision=digest)  # changed after it was reviewed
    assert not marker.exists()


# a Llama gives no Gemma 4 vision geometry to fill the design's null arguments from: the run names it
LLAMA_VISION = ("model.vision.patch_size=16", "model.vision.pooling_kernel_size=3", "model.vision.posemb_size=64")


def test_pinned_remote_code_loads_through_the_config(remote_code_dir, make_cfg):
    path, marker = remote_code_dir
    cfg = make_cfg(f"backbone.path={path}", "+backbone.trust_remote_code=true",
                   f"+backbone.revision={code_digest(path)}", "model/vision=linear", "model/audio=none",
                   *LLAMA_VISION)
    model = build_model(cfg)
    assert marker.read_text() == "modeling ran"
    assert is_remote_code(model.backbone.text_config)  # the checkpoint's PinnedConfig, not LlamaConfig
    ids = torch.tensor([[2, 40, 41, 42]])
    assert model.backbone.logits(model.backbone(model.backbone.embed(ids))).shape == (1, 4, 272)


def test_a_run_on_remote_code_needs_consent_again_when_it_is_loaded(remote_code_dir, make_cfg, tmp_path):
    """A run directory is often someone else's: its config.yaml alone cannot switch remote code on."""
    from gemma_fusion.core.config import save_yaml
    from gemma_fusion.training.callbacks import save_final
    from gemma_fusion.artifacts.load import load_for_inference

    path, marker = remote_code_dir
    cfg = make_cfg(f"backbone.path={path}", "+backbone.trust_remote_code=true",
                   f"+backbone.revision={code_digest(path)}", "model/vision=linear", "model/audio=none",
                   *LLAMA_VISION)
    run = tmp_path / "run"
    run.mkdir()
    save_yaml(cfg, run / "config.yaml")
    save_final(build_model(cfg), run)
    marker.unlink()
    with pytest.raises(UserError, match="runs its own Python code.*pass trust_remote_code=true to eval.py"):
        load_for_inference(run)
    assert not marker.exists()
    model, _ = load_for_inference(run, trust_remote_code=True)
    assert is_remote_code(model.backbone.text_config)
