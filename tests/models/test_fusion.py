"""FusionModel behaviour: learning on one batch, target-only logits, generic (non-Gemma) backbones."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gemma_fusion import FusionModel
from gemma_fusion.data.collate import collate
from gemma_fusion.data.sequence import build_sequence
from gemma_fusion.inference.generate import greedy_generate
from gemma_fusion.models.backbone import load_backbone
from gemma_fusion.models.projectors import AudioFrameProjector, PatchEmbedder
from gemma_fusion.models.tokenizer import build_byte_tokenizer
from gemma_fusion.models.lora import add_lora
from gemma_fusion.models.trainable import set_trainable


def _samples(model: FusionModel, n: int = 4, seed: int = 0, targets=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        grid = torch.tensor([(x, 0) for x in range(3)])
        pixels = torch.rand(3, model.vision.patch_dim, generator=g)
        frames = torch.randn(4 + i, model.audio.frame_dim, generator=g) * 0.1
        seq = build_sequence(model.tokenizer, model.tokens, "Read:", f"{i}{i + 1}" if targets else None, [3], [4 + i])
        out.append(dict(input_ids=seq.input_ids, labels=seq.labels, mm_token_type_ids=seq.mm_token_type_ids,
                        images=[(pixels, grid)], audio=[frames], key=str(i), task="t", prompt="Read:",
                        target=f"{i}{i + 1}"))
    return out


def test_overfitting_one_batch_drives_the_loss_down(tiny_gemma4_dir):
    torch.manual_seed(0)
    model = FusionModel.from_pretrained(tiny_gemma4_dir)
    with torch.no_grad():  # random 0.02-std tied embeddings cap every logit near +-1; give them a trained model's scale
        model.backbone.decoder.embed_tokens.weight.mul_(8)
    add_lora(model.backbone.decoder, 8, 16, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj"])
    set_trainable(model)
    batch = collate(_samples(model), model.tokens.pad)
    batch.pop("meta")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(40):
        loss = model(**batch).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first


def test_logits_only_at_targets_and_full_logits_without_labels(tiny_gemma4_dir):
    model = FusionModel.from_pretrained(tiny_gemma4_dir).eval()
    batch = collate(_samples(model), model.tokens.pad)
    batch.pop("meta")
    n_targets = int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        out = model(**batch)
        full = model(**{**batch, "labels": None})
    assert out.logits.shape == (n_targets, model.backbone.text_config.vocab_size) == (out.num_targets, 272)
    assert full.logits.shape == (*batch["input_ids"].shape, 272)


def test_greedy_generation_agrees_with_teacher_forced_argmax(tiny_gemma4_dir):
    model = FusionModel.from_pretrained(tiny_gemma4_dir).eval()
    prompts = collate(_samples(model, targets=False), model.tokens.pad)
    generated = greedy_generate(model, prompts, max_new_tokens=5)
    for i, new in enumerate(generated):
        row = _samples(model, targets=False)[i]
        ids = torch.tensor([row["input_ids"] + new])
        types = torch.tensor([row["mm_token_type_ids"] + [0] * len(new)])
        pv, pos = row["images"][0]
        with torch.no_grad():
            logits = model(ids, pixel_values=pv[None], image_position_ids=pos[None],
                           input_features=row["audio"][0][None], mm_token_type_ids=types).logits[0]
        start = len(row["input_ids"]) - 1
        assert logits[start : start + len(new)].argmax(-1).tolist() == new


def test_special_token_text_in_a_prompt_stays_text():
    tok = build_byte_tokenizer()
    from gemma_fusion.core.batch import SpecialTokens

    tokens = SpecialTokens(2, 1, 0, [3], [4], 5, [6], [7], 8)
    seq = build_sequence(tok, tokens, "<boi><image>", "ok")
    assert 3 not in seq.input_ids[1:] and 5 not in seq.input_ids
    assert tok.decode(seq.input_ids[1:-3]) == "<boi><image>"
    assert [t for t in seq.labels if t != -100] == tok("ok", add_special_tokens=False)["input_ids"] + [1]


def test_any_causal_lm_works_as_a_backbone(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=2,
                         eos_token_id=1)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    build_byte_tokenizer().save_pretrained(tmp_path)
    loaded = load_backbone(tmp_path)
    assert loaded.multimodal.vision_state is None and not loaded.bidirectional_image
    assert loaded.tokens.image_start == loaded.tokenizer("<image>", add_special_tokens=False)["input_ids"]
    model = FusionModel(loaded.backbone, loaded.tokens, PatchEmbedder(64, embed_dim=32, posemb_size=16),
                        AudioFrameProjector(64), bidirectional_image=True, tokenizer=loaded.tokenizer)
    batch = collate(_samples(model), model.tokens.pad)
    batch.pop("meta")
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and model.vision.patch_dense.weight.grad is not None


def test_projector_width_mismatch_is_one_sentence(tiny_gemma4_dir):
    loaded = load_backbone(tiny_gemma4_dir)
    with pytest.raises(ValueError, match="outputs width 32 but the backbone's hidden size is 64"):
        FusionModel(loaded.backbone, loaded.tokens, audio=AudioFrameProjector(32))


def test_uint8_pixels_equal_their_rescaled_floats(tiny_gemma4_dir):
    """The loader keeps pixels uint8; the model's rescale must equal the processor's float input."""
    model = FusionModel.from_pretrained(tiny_gemma4_dir)
    batch = collate(_samples(model), model.tokens.pad)
    batch.pop("meta")
    pixels = torch.randint(0, 256, batch["pixel_values"].shape, dtype=torch.uint8)
    with torch.no_grad():
        as_uint8 = model(**{**batch, "pixel_values": pixels}).logits
        as_float = model(**{**batch, "pixel_values": pixels.float() / 255}).logits
        assert torch.equal(as_uint8, model(**{**batch, "pixel_values": pixels.float() * (1 / 255)}).logits)
    torch.testing.assert_close(as_uint8, as_float, rtol=0, atol=1e-5)


def test_packed_rows_give_each_sample_its_unpacked_logits(tiny_gemma4_dir):
    """Packing (positions restart, attention confined per sample) must not change any sample's logits."""
    from gemma_fusion.data.batching import merge_row

    model = FusionModel.from_pretrained(tiny_gemma4_dir).eval()
    samples = _samples(model)
    packed = collate([merge_row(samples[:3]), merge_row(samples[3:])], model.tokens.pad)
    packed.pop("meta")
    assert packed["segment_ids"][0].max() == 3
    with torch.no_grad():
        logits = model(**{k: v for k, v in packed.items() if k != "labels"}).logits
        row, offset = 0, 0
        for i, sample in enumerate(samples):
            alone = collate([sample], model.tokens.pad)
            alone.pop("meta")
            expected = model(**{k: v for k, v in alone.items() if k != "labels"}).logits[0]
            if i == 3:
                row, offset = 1, 0
            n = len(sample["input_ids"])
            torch.testing.assert_close(logits[row, offset: offset + n], expected, rtol=1e-4, atol=1e-4)
            offset += n
        # and packing without confinement would differ: the mask is doing the work
        leaky = model(**{k: v for k, v in packed.items() if k not in ("labels", "segment_ids", "position_ids")}).logits
    n0 = len(samples[0]["input_ids"])
    assert not torch.allclose(leaky[0, n0: 2 * n0], logits[0, n0: 2 * n0], atol=1e-3)


def test_misspelt_batch_key_is_rejected(tiny_gemma4_dir):
    model = FusionModel.from_pretrained(tiny_gemma4_dir)
    batch = collate(_samples(model), model.tokens.pad)
    with pytest.raises(TypeError, match="pixel_value"):
        model(**batch, pixel_value=batch["pixel_values"])
