"""FusionModel against transformers' own Gemma4UnifiedForConditionalGeneration on the same checkpoint."""
from __future__ import annotations

import torch
from transformers import Gemma4UnifiedForConditionalGeneration

from gemma_fusion import FusionModel
from gemma_fusion.core.batch import AUDIO, IMAGE


def _batch(model: FusionModel, seed: int = 0):
    """Two samples: (image 2x3 tokens, image 1x4 tokens, text) and (image 1x4, audio 5 frames, text), right-padded."""
    g = torch.Generator().manual_seed(seed)
    t = model.tokens
    patch_dim, frame = model.vision.patch_dim, model.audio.frame_dim
    img_a = [(x, y) for y in range(2) for x in range(3)]
    img_b = [(x, 0) for x in range(4)]
    max_p = 6
    pixel_values = torch.rand(3, max_p, patch_dim, generator=g)
    pos = torch.full((3, max_p, 2), -1, dtype=torch.long)
    for i, grid in enumerate([img_a, img_b, img_b]):
        pos[i, : len(grid)] = torch.tensor(grid)
    audio = torch.randn(1, 7, frame, generator=g) * 0.1
    audio_mask = torch.tensor([[True] * 5 + [False] * 2])
    def text(n):
        return torch.randint(20, 200, (n,), generator=g).tolist()
    s0 = [t.bos, *t.image_start, *[t.image_token] * 6, *t.image_end, *t.image_start, *[t.image_token] * 4,
          *t.image_end, *text(9)]
    s1 = [t.bos, *t.image_start, *[t.image_token] * 4, *t.image_end, *t.audio_start, *[t.audio_token] * 5,
          *t.audio_end, *text(5)]
    width = max(len(s0), len(s1))
    input_ids = torch.full((2, width), t.pad)
    attention_mask = torch.zeros(2, width, dtype=torch.long)
    labels = torch.full((2, width), -100)
    for i, s in enumerate([s0, s1]):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
        labels[i, len(s) - 4 : len(s)] = input_ids[i, len(s) - 4 : len(s)]
    mm = torch.zeros_like(input_ids)
    mm[input_ids == t.image_token] = IMAGE
    mm[input_ids == t.audio_token] = AUDIO
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                image_position_ids=pos, input_features=audio, input_features_mask=audio_mask, labels=labels,
                mm_token_type_ids=mm)


def test_loss_and_logits_match_transformers(tiny_gemma4_dir):
    ours = FusionModel.from_pretrained(tiny_gemma4_dir).eval()
    theirs = Gemma4UnifiedForConditionalGeneration.from_pretrained(tiny_gemma4_dir).eval()
    assert ours.vision.patch_dim == 12 * 12 * 3 and ours.audio.frame_dim == 320
    assert ours.vision.multimodal_embedder.embedding_projection.weight.shape == (64, 48)
    batch = _batch(ours)
    with torch.no_grad():
        ref = theirs(**batch)
        out = ours(**batch)
        full = ours(**{**batch, "labels": None})
    assert torch.isfinite(ref.loss)
    assert abs(out.loss.item() - ref.loss.item()) < 1e-4
    sel = batch["labels"][:, 1:] != -100
    torch.testing.assert_close(out.logits, ref.logits[:, :-1][sel].float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(full.logits, ref.logits, atol=1e-4, rtol=1e-4)


def test_bidirectional_image_attention_changes_the_loss(tiny_gemma4_dir):
    """The block mask is live: turning it off changes the result (so parity above is not vacuous)."""
    ours = FusionModel.from_pretrained(tiny_gemma4_dir).eval()
    causal = FusionModel.from_pretrained(tiny_gemma4_dir, bidirectional_image=False).eval()
    batch = _batch(ours)
    with torch.no_grad():
        assert abs(ours(**batch).loss.item() - causal(**batch).loss.item()) > 1e-6


def test_bf16_loss_matches_transformers_in_bf16(tiny_gemma4_dir):
    """Tolerance, derived: both sides run the same bf16 operations (embedders, decoder, LM head, soft-cap) and only
    then reduce in fp32 (cross-entropy over 8 targets), so the losses may differ only by the order of that fp32
    mean: a few ulps of a loss near 5.5 (ulp = 4.8e-7; measured here: 1 ulp). TOL = 2e-5 (~40 ulps) allows that
    and little more: one operation run in another precision moves the loss further (measured on this batch: the
    LM head in fp32 4.3e-5, the projectors left in fp32 4.3e-3), and transformers' own fp32-vs-bf16 gap (5.1e-3)
    is checked below to exceed 10 TOL, so bf16 rounding is really in play."""
    tol = 2e-5
    ours = FusionModel.from_pretrained(tiny_gemma4_dir, dtype="bfloat16").eval()
    theirs = Gemma4UnifiedForConditionalGeneration.from_pretrained(tiny_gemma4_dir, dtype=torch.bfloat16).eval()
    theirs_fp32 = Gemma4UnifiedForConditionalGeneration.from_pretrained(tiny_gemma4_dir).eval()
    batch = _batch(ours)
    with torch.no_grad():
        got, want, fp32 = ours(**batch).loss, theirs(**batch).loss, theirs_fp32(**batch).loss
    assert abs(want.item() - fp32.item()) > 10 * tol
    assert abs(got.item() - want.item()) < tol
