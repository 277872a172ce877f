"""What training reads, against transformers + peft on the same checkpoint: gradients and packed rows.

The oracle is `Gemma4UnifiedForConditionalGeneration` (with peft's own `get_peft_model` for LoRA), run on
the same weights and batch in fp32. The checkpoint has a 4-token sliding window, shorter than the image
blocks, so the bidirectional image attention reaches past the window on the sliding layer.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import Gemma4UnifiedForConditionalGeneration

from gemma_fusion import FusionModel
from gemma_fusion.core.batch import IGNORE_INDEX, model_inputs
from gemma_fusion.data.batching import merge_row, pack_rows
from gemma_fusion.data.collate import collate
from gemma_fusion.data.sequence import build_sequence
from gemma_fusion.models.lora import add_lora
from gemma_fusion.models.trainable import set_trainable
from tests.conftest import save_tiny_gemma4
from tests.models.test_parity import _batch

WINDOW = 4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


@pytest.fixture(scope="module")
def window4_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_gemma4_window4")
    save_tiny_gemma4(path, mm_embed_dim=48, audio_samples_per_token=320, patch_size=4, sliding_window=WINDOW)
    return path


def _sharpen(embedding: torch.Tensor) -> None:
    """Random 0.02-std tied embeddings make every logit tiny, so context barely moves the loss; give them a trained
    model's scale (the tied LM head follows), on both sides alike."""
    with torch.no_grad():
        embedding.mul_(8)


def _longest_block(mm_token_type_ids: torch.Tensor) -> int:
    """Longest run of image placeholders in any row."""
    best = 0
    for row in (mm_token_type_ids == 1).tolist():
        run = 0
        for is_image in row:
            run = run + 1 if is_image else 0
            best = max(best, run)
    return best


def test_projector_and_lora_gradients_match_transformers_and_peft(window4_dir):
    ours = FusionModel.from_pretrained(window4_dir).eval()
    add_lora(ours.backbone.decoder, r=4, alpha=8, dropout=0.0, target_modules=TARGETS)
    set_trainable(ours)
    theirs = Gemma4UnifiedForConditionalGeneration.from_pretrained(window4_dir)
    theirs = get_peft_model(theirs, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS)).eval()
    base = theirs.get_base_model()
    base.model.embed_vision.requires_grad_(True)  # peft freezes all but the adapters; the projectors train too
    base.model.embed_audio.requires_grad_(True)

    def counterpart(name: str) -> str:  # our parameter name -> the name in transformers' model
        for ours_prefix, their_prefix in (("vision.", "model.embed_vision."), ("audio.", "model.embed_audio."),
                                          ("backbone.decoder.", "model.language_model.")):
            if name.startswith(ours_prefix):
                return their_prefix + name[len(ours_prefix):]
        raise KeyError(name)

    trainable = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    their_params = dict(base.named_parameters())
    assert {counterpart(n) for n in trainable} == {n for n, p in their_params.items() if p.requires_grad}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # identical non-zero adapters on both sides (peft starts B at 0, which hides A's gradient)
        for name, param in trainable.items():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)
                their_params[counterpart(name)].copy_(param)
    _sharpen(ours.backbone.decoder.get_input_embeddings().weight)
    _sharpen(base.get_input_embeddings().weight)

    batch = _batch(ours)
    assert _longest_block(batch["mm_token_type_ids"]) > WINDOW  # the image block reaches past the sliding window
    assert batch["attention_mask"][1, -1] == 0  # the second row is right-padded
    ours_loss, their_loss = ours(**batch).loss, theirs(**batch).loss
    ours_loss.backward()
    their_loss.backward()
    assert abs(ours_loss.item() - their_loss.item()) < 1e-4
    assert sum("lora_" in name for name in trainable) == 2 * 2 * len(TARGETS)  # A and B, 2 layers
    for name, param in trainable.items():
        want = their_params[counterpart(name)].grad
        assert want is not None and want.abs().max() > 1e-6, name  # a gradient that could be wrong
        torch.testing.assert_close(param.grad, want, atol=1e-4, rtol=1e-4, msg=name)


def _samples(model: FusionModel) -> list[dict]:
    """Five samples as the loader makes them: an image block longer than the window, audio, both, text only."""
    g = torch.Generator().manual_seed(0)
    out = []
    for key, (n_image, n_audio, prompt, target) in enumerate([(6, 0, "Read:", "ab12"), (0, 5, "Say", "7 8 9"),
                                                             (5, 3, "Both?", "x"), (0, 0, "text only", "yes"),
                                                             (7, 0, "R", "hello")]):
        grid = torch.tensor([(x % 3, x // 3) for x in range(n_image)])
        images = [(torch.rand(n_image, model.vision.patch_dim, generator=g), grid)] if n_image else []
        audio = [torch.randn(n_audio, model.audio.frame_dim, generator=g) * 0.1] if n_audio else []
        seq = build_sequence(model.tokenizer, model.tokens, prompt, target, [n_image] if n_image else [],
                             [n_audio] if n_audio else [])
        out.append(dict(input_ids=seq.input_ids, labels=seq.labels, mm_token_type_ids=seq.mm_token_type_ids,
                        images=images, audio=audio, key=str(key)))
    return out


@torch.no_grad()
def test_each_sample_of_a_packed_row_has_the_loss_transformers_gives_it_alone(window4_dir):
    ours = FusionModel.from_pretrained(window4_dir).eval()
    theirs = Gemma4UnifiedForConditionalGeneration.from_pretrained(window4_dir).eval()
    _sharpen(ours.backbone.decoder.get_input_embeddings().weight)
    _sharpen(theirs.get_input_embeddings().weight)
    samples = _samples(ours)
    rows = pack_rows(samples, 40)  # what data.pack_length=40 does
    assert max(len(row) for row in rows) > 1 and any(len(row) == 1 for row in rows)
    batch = collate([merge_row(row) for row in rows], ours.tokens.pad)
    assert "segment_ids" in batch and _longest_block(batch["mm_token_type_ids"]) > WINDOW

    out = ours(**model_inputs(batch))
    targets = batch["labels"][:, 1:]
    selected = targets != IGNORE_INDEX
    per_target = F.cross_entropy(out.logits, targets[selected], reduction="none")
    segment = batch["segment_ids"][:, 1:][selected]
    row_of = torch.arange(len(rows))[:, None].expand_as(selected)[selected]
    checked = 0
    for r, row in enumerate(rows):
        for number, sample in enumerate(row, start=1):
            packed = per_target[(row_of == r) & (segment == number)].mean()
            alone = collate([sample], ours.tokens.pad)
            alone.pop("meta")
            want = theirs(**alone).loss
            assert abs(packed.item() - want.item()) < 1e-4, f"sample {sample['key']} in row {r}"
            checked += 1
    assert checked == len(samples)
