"""Analytical FLOPs against torch's FlopCounterMode on real forwards of tiny decoders.

How attention is checked: with attn_implementation="eager", FlopCounterMode sees the two attention
matmuls (Q @ K^T, P @ V) as dense S x S bmm's (the causal / sliding mask is added afterwards), and nothing
else in the forward is a matmul except the weight Linears and the head. So
    measured == linear + lm_head + sum_layers 4 * heads * head_dim_layer * S * S
exactly, with each layer's head dim read from the built module. The causal term is checked separately:
against the allowed (query, key) pairs of the masks transformers itself hands each layer, and by hand.
Every config has a sliding window shorter than S and full-attention layers with another head dim, so a
missed matmul, a wrong per-layer dim or an off-by-one window breaks an equality.
"""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from transformers import (
    Gemma4UnifiedForCausalLM,
    Gemma4UnifiedForConditionalGeneration,
    Gemma4UnifiedTextConfig,
    PhiConfig,
    PhiForCausalLM,
)

from gemma_fusion.models.flops import backbone_forward_flops, causal_keys, count_forward_flops, params_of
from gemma_fusion.models.tiny import tiny_gemma4_config


def _tiny_unified(**overrides) -> tuple[nn.Module, nn.Module, object]:
    """(decoder, lm head, text config) of a tiny Gemma4UnifiedForConditionalGeneration, eager attention."""
    torch.manual_seed(0)
    model = Gemma4UnifiedForConditionalGeneration(tiny_gemma4_config(**overrides)).eval()
    model.set_attn_implementation("eager")
    return model.model.language_model, model.lm_head, model.config.text_config


def _tiny_gemma4_text_exotic() -> tuple[nn.Module, nn.Module, object]:
    """Fields tiny_gemma4_config does not set: K = V with 1 global KV head, 2 KV-shared double-wide layers."""
    config = Gemma4UnifiedTextConfig(
        vocab_size=300, hidden_size=48, intermediate_size=80, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, global_head_dim=24, num_global_key_value_heads=1, attention_k_eq_v=True,
        num_kv_shared_layers=2, use_double_wide_mlp=True, sliding_window=5,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
    )
    torch.manual_seed(0)
    model = Gemma4UnifiedForCausalLM(config).eval()
    model.set_attn_implementation("eager")
    return model.model, model.lm_head, config


CASES = {
    "h64_2layers": lambda: _tiny_unified(hidden_size=64, num_hidden_layers=2, sliding_window=5),
    "h96_6layers_mixed": lambda: _tiny_unified(hidden_size=96, num_hidden_layers=6, num_attention_heads=6,
                                               num_key_value_heads=3, intermediate_size=160, sliding_window=7),
    "k_eq_v_kv_shared_double_wide": _tiny_gemma4_text_exotic,
}


def _measure(decoder: nn.Module, head: nn.Module, seq_len: int) -> tuple[int, list[tuple[torch.Tensor, nn.Module]]]:
    """FlopCounterMode FLOPs of decoder + head on one [1, S, H] sequence, and each layer's (mask, self_attn)."""
    seen = []
    hooks = [layer.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((kwargs["attention_mask"], mod.self_attn)), with_kwargs=True)
        for layer in decoder.layers]
    x = torch.randn(1, seq_len, head.in_features)
    flops = count_forward_flops(lambda: head(decoder(inputs_embeds=x, use_cache=False).last_hidden_state))
    for hook in hooks:
        hook.remove()
    return flops, seen


def _heads_x_dim(attn: nn.Module) -> int:
    return attn.config.num_attention_heads * attn.head_dim


@pytest.mark.parametrize("case", CASES)
def test_linear_and_head_equal_flop_counter(case):
    decoder, head, config = CASES[case]()
    seq_len = 16
    measured, layers = _measure(decoder, head, seq_len)
    dense_attention = sum(4 * _heads_x_dim(attn) * seq_len * seq_len for _, attn in layers)
    flops = backbone_forward_flops(config, seq_len)
    assert measured == flops["linear"] + flops["lm_head"] + dense_attention
    assert flops["lm_head"] == 2 * config.hidden_size * config.vocab_size * seq_len
    assert flops["total"] == flops["linear"] + flops["attention"] + flops["lm_head"]


@pytest.mark.parametrize("case", CASES)
def test_causal_attention_equals_transformers_masks(case):
    decoder, head, config = CASES[case]()
    seq_len = 16
    _, layers = _measure(decoder, head, seq_len)
    allowed = sum(4 * _heads_x_dim(attn) * int((mask == 0).sum()) for mask, attn in layers)  # additive float masks
    assert backbone_forward_flops(config, seq_len)["attention"] == allowed


def test_causal_attention_by_hand():
    """S=8, window 3: sliding keys 1+2+3*6 = 21, full keys 1+..+8 = 36.

    Layer 0 is sliding (head dim 16), layer 1 full (global head dim 32); 4 heads each.
    """
    config = tiny_gemma4_config(hidden_size=64, num_hidden_layers=2, sliding_window=3).text_config
    assert (causal_keys(8, 3), causal_keys(8, None), causal_keys(8, 20)) == (21, 36, 36)
    flops = backbone_forward_flops(config, 8, target_tokens=3)
    assert flops["attention"] == 2 * 2 * 4 * 16 * 21 + 2 * 2 * 4 * 32 * 36 == 23808
    assert flops["lm_head"] == 2 * 64 * config.vocab_size * 3


def test_decoder_path_counts_base_weights_and_lora_separately():
    decoder, head, config = _tiny_unified(hidden_size=64, num_hidden_layers=2, sliding_window=5)
    seq_len, r = 12, 4
    plain = backbone_forward_flops(config, seq_len)
    measured_plain, _ = _measure(decoder, head, seq_len)
    inject_adapter_in_model(LoraConfig(r=r, target_modules=["q_proj", "v_proj"]), decoder)
    flops = backbone_forward_flops(config, seq_len, decoder=decoder)
    # (in + out) of q_proj, v_proj: sliding layer (hd 16) 64->64, 64->32; full layer (hd 32) 64->128, 64->64
    assert flops["lora"] == 2 * r * seq_len * ((64 + 64) + (64 + 32) + (64 + 128) + (64 + 64))
    for key in ("linear", "attention", "lm_head"):
        assert flops[key] == plain[key]
    assert flops["total"] == plain["total"] + flops["lora"]
    measured_lora, _ = _measure(decoder, head, seq_len)
    assert measured_lora - measured_plain == flops["lora"]


def test_unknown_model_type_needs_decoder():
    config = PhiConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4)
    with pytest.raises(ValueError, match="decoder="):
        backbone_forward_flops(config, 8)
    torch.manual_seed(0)
    model = PhiForCausalLM(config).eval()
    model.set_attn_implementation("eager")
    measured, layers = _measure(model.model, model.lm_head, 8)
    flops = backbone_forward_flops(config, 8, decoder=model.model)
    assert measured == flops["linear"] + flops["lm_head"] + sum(4 * _heads_x_dim(a) * 64 for _, a in layers)
    assert "lora" not in flops


def test_params_of_counts_tied_weights_once():
    """Against counts made without `module.parameters()` (which already drops repeats): every parameter name
    (the tied table under two names) minus one copy of the table; transformers' own count; a hand-built tie."""
    model = Gemma4UnifiedForConditionalGeneration(tiny_gemma4_config())
    text = model.config.text_config
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight  # the tie is really there
    every_name = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert params_of(model) == every_name - text.vocab_size * text.hidden_size  # the head's copy counted once
    assert params_of(model) == model.num_parameters()  # transformers' own count

    embed, head = nn.Embedding(11, 4), nn.Linear(4, 11, bias=True)
    head.weight = embed.weight
    assert params_of(nn.Sequential(embed, head)) == 11 * 4 + 11  # one table + the head's bias
    assert params_of(nn.Linear(3, 5)) == 3 * 5 + 5
