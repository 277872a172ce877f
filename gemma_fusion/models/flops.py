"""Analytical forward FLOPs of the frozen decoder (for MFU logging and compute accounting of ablations).

Convention: one multiply-add = 2 FLOPs, the same as `torch.utils.flop_counter.FlopCounterMode`.

Counted, per sequence of S tokens:
  * linear: every weight matmul of every decoder layer (q, k, v, o projections; MLP gate, up, down),
    2 * in * out per token. Gemma 4 unified is modelled layer by layer from its config: full-attention
    layers use `global_head_dim` (and `num_global_key_value_heads` when `attention_k_eq_v`),
    `attention_k_eq_v` drops v_proj on full-attention layers (V = K), the last `num_kv_shared_layers`
    layers reuse earlier K/V (no k_proj / v_proj), and `use_double_wide_mlp` doubles the MLP width of
    those KV-shared layers. Llama-style configs (LLAMA_STYLE) use one geometry for all layers.
  * attention: Q @ K^T and P @ V, causal: query i sees min(i + 1, window) keys (window = `sliding_window`
    on sliding layers, S on full ones), i.e. 2 matmuls * 2 * head_dim * num_attention_heads * sum_i keys(i)
    per layer. Grouped K/V heads do not reduce this. Bidirectional image blocks are counted as causal.
  * lm_head: 2 * hidden * vocab per position where logits are computed.
  * lora (only with `decoder=` holding adapters): 2 * r * (in + out) per token and adapted Linear.

Not counted: embedding lookup, norms, rotary embeddings, softmax, soft-capping, activations, residual
adds and other elementwise ops, biases, DoRA's per-step weight norm, and the multimodal projectors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from gemma_fusion.models.quant import QuantizedLinear

GEMMA4 = "gemma4_unified_text"
LLAMA_STYLE = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"})


@dataclass(frozen=True)
class _Layer:
    """Shapes of one decoder layer. `kv_projections`: 2 (k, v), 1 (V = K) or 0 (K/V reused)."""

    heads: int
    head_dim: int
    kv_heads: int
    kv_projections: int
    intermediate: int
    window: int | None


def _window(config, layer_idx: int) -> int | None:
    """The layer's sliding window, or None for full causal attention."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:  # Mistral-style: one window (or none) for every layer
        return getattr(config, "sliding_window", None)
    kind = layer_types[layer_idx]
    if kind not in ("sliding_attention", "full_attention"):
        raise ValueError(f"Cannot count FLOPs of layer type '{kind}' (layer {layer_idx}).")
    return config.sliding_window if kind == "sliding_attention" else None


def _gemma4_layers(config) -> list[_Layer]:
    """Per-layer shapes as Gemma4UnifiedTextAttention / Gemma4UnifiedTextMLP build them."""
    layers = []
    for i, sharing in enumerate(config.kv_sharing_modes):
        lc = config.per_layer_config[i] if config.is_heterogeneous else config
        window = _window(config, i)
        shared = sharing == "reuse"
        kv_projections = 0 if shared else 1 if config.attention_k_eq_v and window is None else 2
        wide = 2 if config.use_double_wide_mlp and shared else 1
        layers.append(_Layer(lc.num_attention_heads, lc.head_dim, lc.num_key_value_heads, kv_projections,
                             lc.intermediate_size * wide, window))
    return layers


def _uniform_layers(config) -> list[_Layer]:
    """Llama-style shapes, identical in every layer; used for attention of any other model too."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    intermediate = getattr(config, "intermediate_size", 0)
    return [_Layer(heads, head_dim, kv_heads, 2, intermediate, _window(config, i))
            for i in range(config.num_hidden_layers)]


def decoder_layers(text_config) -> list[_Layer]:
    """Per-layer attention and MLP shapes of a text config (Gemma 4's per-layer geometry, K = V and shared K/V;
    Llama-style for any other model); also what the memory planner reads the KV cache from."""
    if getattr(text_config, "model_type", None) == GEMMA4:
        return _gemma4_layers(text_config)
    return _uniform_layers(text_config)


def _layer_linear_macs(layer: _Layer, hidden: int) -> int:
    """Multiply-adds per token of q, k, v, o and gate, up, down."""
    q_out = layer.heads * layer.head_dim
    return 2 * hidden * q_out + layer.kv_projections * hidden * layer.kv_heads * layer.head_dim \
        + 3 * hidden * layer.intermediate


def causal_keys(seq_len: int, window: int | None) -> int:
    """sum_i min(i + 1, window) over i < seq_len: the (query, key) pairs a causal (sliding) mask allows."""
    if window is None or window >= seq_len:
        return seq_len * (seq_len + 1) // 2
    return window * (window + 1) // 2 + (seq_len - window) * window


def _lora_layers(decoder: nn.Module) -> list[nn.Module]:
    """peft LoRA layers (modules with `lora_A` / `lora_B` ModuleDicts)."""
    return [m for m in decoder.modules() if isinstance(getattr(m, "lora_A", None), nn.ModuleDict)
            and isinstance(getattr(m, "lora_B", None), nn.ModuleDict)]


def _lora_macs(layer: nn.Module) -> int:
    """Per-token multiply-adds of the layer's active, unmerged adapters: r * (in + out) each."""
    if getattr(layer, "disable_adapters", False) or getattr(layer, "merged", False):
        return 0
    return sum(layer.lora_A[name].in_features * layer.lora_A[name].out_features
               + layer.lora_B[name].in_features * layer.lora_B[name].out_features
               for name in layer.active_adapters if name in layer.lora_A)


def _module_macs(decoder: nn.Module) -> tuple[int, int]:
    """(base Linear, LoRA) multiply-adds per token; the lm head and lora_A / lora_B Linears are not base."""
    lora = _lora_layers(decoder)
    skip = {id(m) for layer in lora for adapters in (layer.lora_A, layer.lora_B) for m in adapters.modules()}
    head = decoder.get_output_embeddings() if hasattr(decoder, "get_output_embeddings") else None
    skip.add(id(head))
    base = sum(m.in_features * m.out_features for m in decoder.modules()
               if isinstance(m, (nn.Linear, QuantizedLinear)) and id(m) not in skip)
    return base, sum(_lora_macs(layer) for layer in lora)


def backbone_forward_flops(text_config, seq_len: int, target_tokens: int | None = None, *,
                           decoder: nn.Module | None = None) -> dict[str, int]:
    """Forward FLOPs of ONE sequence of `seq_len` tokens through the decoder and the LM head.

    `text_config`: a transformers (text) config; a composite config is reduced with `get_text_config()`.
    `target_tokens`: positions where logits are computed (default `seq_len`).
    `decoder`: the decoder module; when given, `linear` comes from its nn.Linear shapes (any model type,
    peft LoRA base weights only) and a "lora" term is added if adapters are present.
    Returns {"linear", "attention", "lm_head", ["lora",] "total"}; see the module docstring.
    """
    config = text_config.get_text_config(decoder=True) if hasattr(text_config, "get_text_config") else text_config
    if getattr(config, "use_bidirectional_attention", None) in ("all", True):
        raise ValueError("backbone_forward_flops counts causal attention; this config is fully bidirectional.")
    model_type = getattr(config, "model_type", None)
    layers = decoder_layers(config)
    hidden = config.hidden_size
    out = {}
    if decoder is not None:
        base, lora = _module_macs(decoder)
        out["linear"] = 2 * base * seq_len
        if lora:
            out["lora"] = 2 * lora * seq_len
    elif model_type == GEMMA4 or model_type in LLAMA_STYLE:
        out["linear"] = 2 * seq_len * sum(_layer_linear_macs(layer, hidden) for layer in layers)
    else:
        raise ValueError(f"No exact FLOP model for model_type '{model_type}'; pass decoder= to count its Linears.")
    out["attention"] = sum(4 * layer.heads * layer.head_dim * causal_keys(seq_len, layer.window) for layer in layers)
    out["lm_head"] = 2 * hidden * config.vocab_size * (seq_len if target_tokens is None else target_tokens)
    out["total"] = sum(out.values())
    return out


def count_forward_flops(fn, *args, **kwargs) -> int:
    """FLOPs FlopCounterMode counts while running fn(*args, **kwargs) under torch.no_grad()."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


def params_of(module: nn.Module) -> int:
    """Number of parameters (tied weights once), e.g. for 6 * N * tokens estimates."""
    return sum(p.numel() for p in module.parameters())
