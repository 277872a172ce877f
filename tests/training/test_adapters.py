"""LoRA adapters: peft-format round trip onto the user's own transformers model, and merging."""
from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Gemma4UnifiedForConditionalGeneration, LlamaConfig, LlamaForCausalLM

from gemma_fusion import FusionModel
from gemma_fusion.models.tokenizer import build_byte_tokenizer
from gemma_fusion.models.lora import merge_lora, save_peft_adapter
from gemma_fusion.models.lora import add_lora
from gemma_fusion.models.trainable import set_trainable

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_model(path, target_modules, use_dora=False) -> tuple[FusionModel, dict]:
    """A FusionModel with adapters whose B (and DoRA magnitude) are random, so they change the logits."""
    model = FusionModel.from_pretrained(path).eval()
    lora = dict(r=4, alpha=8, dropout=0.0, target_modules=target_modules, use_dora=use_dora)
    add_lora(model.backbone.decoder, **lora)
    set_trainable(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.rand(p.shape, generator=g))
    return model, lora


def _text(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(20, 200, (2, 12), generator=g)
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))


def _peft_names(model: torch.nn.Module) -> set[str]:
    return {n.split(".lora_")[0] for n, _ in model.named_parameters() if ".lora_" in n}


def _round_trip(backbone_dir, out_dir, base, targets, use_dora, decoder_path):
    ours, lora = _lora_model(backbone_dir, targets, use_dora)
    batch = _text()
    with torch.no_grad():
        expected = ours(**batch).logits
        assert (expected - base(**batch).logits).abs().max() > 1e-3  # the adapters matter: the test can fail
    save_peft_adapter(ours, out_dir, backbone_path=backbone_dir, lora_config=lora)

    config = json.loads((out_dir / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"], config["use_dora"]) == (4, 8, 0.0, use_dora)
    assert sorted(config["target_modules"]) == sorted(targets)
    assert config["base_model_name_or_path"] == str(backbone_dir) and config["task_type"] == "CAUSAL_LM"

    loaded = PeftModel.from_pretrained(base, out_dir).eval()
    # peft adapted exactly our layers (no missing or extra targets) ...
    assert _peft_names(loaded) == {n.replace("backbone.decoder.", f"base_model.model.{decoder_path}.", 1)
                                   for n in _peft_names(ours)}
    with torch.no_grad():
        got = loaded(**batch).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # ... and our file is byte for byte the one peft writes for the same adapters
    loaded.save_pretrained(out_dir / "peft")
    ours_state = load_file(out_dir / "adapter_model.safetensors")
    peft_state = load_file(out_dir / "peft" / "adapter_model.safetensors")
    assert sorted(ours_state) == sorted(peft_state)
    assert all(torch.equal(ours_state[k], peft_state[k]) for k in ours_state)
    return ours_state


@pytest.mark.parametrize("use_dora", [False, True])
def test_gemma4_adapter_loads_with_peft(tiny_gemma4_dir, tmp_path, use_dora):
    base = Gemma4UnifiedForConditionalGeneration.from_pretrained(tiny_gemma4_dir).eval()
    state = _round_trip(tiny_gemma4_dir, tmp_path, base, ["q_proj", "v_proj"], use_dora, "model.language_model")
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in state
    magnitude = "base_model.model.model.language_model.layers.1.self_attn.v_proj.lora_magnitude_vector"
    assert (magnitude in state) == use_dora


def test_any_causal_lm_adapter_loads_with_peft(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=2,
                         eos_token_id=1)
    backbone_dir = tmp_path / "llama"
    LlamaForCausalLM(config).save_pretrained(backbone_dir)
    build_byte_tokenizer().save_pretrained(backbone_dir)
    base = AutoModelForCausalLM.from_pretrained(backbone_dir).eval()
    state = _round_trip(backbone_dir, tmp_path / "adapter", base, ALL_LINEAR, False, "model")
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in state


def test_wrong_lora_config_is_refused(tiny_gemma4_dir, tmp_path):
    model, lora = _lora_model(tiny_gemma4_dir, ["q_proj", "v_proj"])
    with pytest.raises(ValueError, match="does not describe the adapters"):
        save_peft_adapter(model, tmp_path, lora_config={**lora, "r": 8})


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_keeps_the_logits_and_removes_lora(tiny_gemma4_dir, use_dora):
    model, _ = _lora_model(tiny_gemma4_dir, ALL_LINEAR, use_dora)
    plain = FusionModel.from_pretrained(tiny_gemma4_dir).eval()
    batch = _text()
    with torch.no_grad():
        before = model(**batch).logits
        assert (before - plain(**batch).logits).abs().max() > 1e-3
        assert merge_lora(model) is model
        after = model(**batch).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    assert not [n for n, _ in model.named_parameters() if "lora_" in n]
    assert type(model.backbone.decoder.layers[0].mlp.down_proj) is torch.nn.Linear
