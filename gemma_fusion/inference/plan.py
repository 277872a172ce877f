"""Memory planner: will a backbone fit on one GPU for inference, and how long a context can it hold?

    python -m gemma_fusion.plan backbone=gemma4_12b quant=int4 gpu_gb=16 context=8192 image_tokens=280 \
        audio_seconds=30 [quant_group_size=64] [prefill_chunk=0] [--json]

`backbone` is a preset (`gemma4_12b`, `tiny`, `tiny_s`, `tiny_m`) or a checkpoint directory (its config.json).
Batch 1, base dtype bf16. Sequence S = context + image_tokens + 2 markers (if any) + audio tokens
(ceil(seconds x 16000 / samples per token), 25 per second for Gemma 4) + 2 markers (if any).

Exact (checked byte for byte against a loaded model in tests/test_plan.py):
- weights: the model is built on the `meta` device from the same config class a checkpoint loads into,
  the decoder's Linear layers are quantised by the project's own `quantize_frozen` (int8: 1 byte per weight
  + one bf16 scale per row; int4: half a byte + one scale per `quant_group_size` inputs, rows padded to
  whole groups) and every parameter and buffer is counted (`tensor_bytes`): embeddings (the tied LM head
  once), norms, the vision and audio embedders and RoPE tables stay as they are.
- KV cache after S tokens (a prompt, then at least one decode step), per layer, transformers' DynamicCache:
  2 (K and V) x kv_heads x positions x head_dim x 2 bytes, where positions = S on a global layer and
  min(S, window) on a sliding layer (`DynamicSlidingWindowLayer` keeps the last window - 1 positions visible,
  as a view into the concatenation of those with the newest token: window positions stay allocated).
  Layers that reuse another layer's cache (`num_kv_shared_layers`) store nothing. A K = V global layer
  (`attention_k_eq_v`) has no v_proj but caches K and V separately (V is K after its own norm, no RoPE).

Estimates:
- activations (measured: bench/activation_memory.py; tests/test_plan.py holds it to a measured prefill) = the
  peak of a prefill of C = min(S, prefill_chunk) tokens (default 0 = the whole prompt in one pass, as
  gemma_fusion.inference.generate runs it; a server such as vLLM prefills in chunks, e.g. 2048), or of a decode
  step if larger (one layer's KV copied by torch.cat + the last position's logits, vocab x (2 + 4) bytes).
  The prefill's peak, tensor by tensor as transformers' Gemma 4 code holds them:
  held throughout: a boolean mask per attention kind (C x S global, C x min(S, window - 1 + C) sliding),
  RoPE cos and sin per kind (2 x C x head_dim), and the sliding layers' overhang (after its update a sliding
  layer holds all min(S, window - 1 + C) positions it concatenated until the next step trims them to window);
  plus the largest phase of one layer: the MLP (3 x C x hidden: layer input, residual, normed input; 3 x C x
  ffn: act(gate), up, their product); an RMSNorm of the residual stream in fp32; q_norm (q in bf16, its fp32
  copy and result); attention (q, its output, K and V repeated to every head when 1 < kv_heads < heads, as
  SDPA is given a mask, and that boolean mask made additive in bf16: C x keys x 2 bytes).
  Attention runs in a fused kernel (no score matrix); the kernel's own scratch (CPU flash attention: 0.4 to
  2.2 MB in the bench) and the embedders' run before the prefill are left to the workspace.
- workspace = 1 GiB for the CUDA context, cuBLAS workspace and allocator slack
  + (int8 / int4) the largest quantised Linear dequantised for its matmul (int8: 2 x n x 2 bytes;
  int4: n x (1 + 2 x 2) bytes for n weights).
- gpu_gb is taken as GiB (2**30 bytes): cards sold as "16 GB" have 16 GiB.
max_context is the largest S whose total fits, at most max_position_embeddings.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gemma_fusion.core.errors import UserError
from gemma_fusion.inference.presets import preset_config, preset_names
from transformers import AutoConfig
from gemma_fusion.models.backbone import meta_model
from gemma_fusion.models.flops import decoder_layers
from gemma_fusion.models.quant import QuantizedLinear, quantize_frozen, tensor_bytes

QUANTS = ("bf16", "int8", "int4")
DTYPE_BYTES = 2  # bf16 weights, activations and KV cache
FP32_BYTES = 4  # what RMSNorm upcasts to
FIXED_WORKSPACE = 2**30  # CUDA context + cuBLAS workspace + allocator slack (assumption)
PREFILL_CHUNK = 0  # tokens per prefill step; 0 = the whole prompt in one pass, as gemma_fusion.inference.generate does
SAMPLE_RATE = 16_000
GIB = 2**30


def load_config(backbone: str):
    """A preset's config, or the config.json of a checkpoint directory (read with AutoConfig)."""
    config = preset_config(backbone)
    if config is not None:
        return config
    path = Path(backbone).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(f"backbone={backbone} is neither a preset ({', '.join(preset_names())}) nor a checkpoint "
                        "directory holding a config.json.")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as err:
        raise UserError(f"backbone={backbone}: transformers cannot read its config.json ({err}).") from err


def _meta_model(config):
    """(whole model, decoder) on the meta device, in bf16: shapes and dtypes without memory."""
    try:
        model = meta_model(copy.deepcopy(config), torch.bfloat16)
    except ValueError as err:
        raise UserError(f"backbone has model_type '{config.model_type}', which is not a causal LM that "
                        f"transformers can build ({err}).") from err
    return model, model.get_decoder()


@dataclass(frozen=True)
class CacheLayer:
    """What one decoder layer keeps in the KV cache: nothing (shares another layer's), a window, or everything."""

    kind: str  # "global", "sliding" or "shared"
    kv_heads: int
    head_dim: int
    window: int | None = None

    def positions(self, tokens: int) -> int:
        """Positions allocated after `tokens` tokens, the last of them a one-token decode step.

        transformers' DynamicSlidingWindowLayer.update concatenates its window - 1 kept positions with the new
        one and keeps `full[:, :, -window + 1:]`, a view: window - 1 positions are visible, the whole
        concatenation of `window` positions stays allocated. DynamicLayer (global) holds all of them, and a
        layer reusing another layer's K/V gets a DummyLayer that stores nothing.
        """
        if self.kind == "shared":
            return 0
        return min(tokens, self.window) if self.kind == "sliding" else tokens

    @property
    def bytes_per_position(self) -> int:
        return 0 if self.kind == "shared" else 2 * self.kv_heads * self.head_dim * DTYPE_BYTES  # K and V

    def nbytes(self, tokens: int) -> int:
        return self.positions(tokens) * self.bytes_per_position


def cache_layers(text_config) -> list[CacheLayer]:
    """One CacheLayer per decoder layer, from the layer shapes the FLOP count uses (models/flops.py): a layer
    without K/V projections reuses another's cache, one with a window keeps that many positions."""
    try:
        shapes = decoder_layers(text_config)
    except ValueError as err:  # a layer type that is neither sliding nor full attention
        raise UserError(f"the memory planner cannot model this backbone's attention ({err}).") from err
    return [CacheLayer("shared", s.kv_heads, s.head_dim) if s.kv_projections == 0
            else CacheLayer("sliding", s.kv_heads, s.head_dim, s.window) if s.window
            else CacheLayer("global", s.kv_heads, s.head_dim) for s in shapes]


class MemoryPlanner:
    """Weights (exact), KV cache (exact), activations and workspace (estimates) of one backbone and quantisation."""

    def __init__(self, config, quant: str = "bf16", group_size: int = 64, prefill_chunk: int = PREFILL_CHUNK):
        if quant not in QUANTS:
            raise UserError(f"quant={quant} is not supported; choose one of {', '.join(QUANTS)}.")
        self.config, self.quant, self.prefill_chunk = config, quant, prefill_chunk
        self.text = config.get_text_config()
        model, decoder = _meta_model(config)
        self.parameters = sum(p.numel() for p in model.parameters())
        decoder.requires_grad_(False)  # as build_model leaves it: every decoder Linear is frozen
        if quant != "bf16":
            quantize_frozen(decoder, quant, group_size)
        self.weights_bytes = tensor_bytes(model)
        quantised = [m for m in decoder.modules() if isinstance(m, QuantizedLinear)]
        self.dequant_bytes = max((m.out_features * m.qweight.shape[1] * (8 // m.bits) for m in quantised), default=0)
        self.layers = cache_layers(self.text)  # (an attention it cannot model stops here, in one sentence)
        self.shapes = decoder_layers(self.text)  # per layer: heads, head_dim, kv_heads, ffn width, window
        self.max_positions = getattr(self.text, "max_position_embeddings", None) or 2**20
        self.audio_config = getattr(config, "audio_config", None)

    def kv_cache_bytes(self, tokens: int) -> int:
        return sum(layer.nbytes(tokens) for layer in self.layers)

    def activation_bytes(self, tokens: int) -> int:
        """Peak bytes beyond the weights and the KV cache after `tokens` tokens (see the module docstring)."""
        chunk = min(tokens, self.prefill_chunk or tokens)
        decode = max(c.nbytes(tokens) for c in self.layers) + self.text.vocab_size * (DTYPE_BYTES + FP32_BYTES)
        return max(self._prefill_bytes(tokens, chunk), decode)

    def _prefill_bytes(self, tokens: int, chunk: int) -> int:
        """The prefill of the last chunk: what it holds throughout + the largest phase of one layer."""
        def keys(shape) -> int:  # key positions the chunk's queries attend over
            return tokens if shape.window is None else min(tokens, shape.window - 1 + chunk)

        kinds = {s.window: s for s in self.shapes}  # one mask and one RoPE table per attention kind
        masks = sum(chunk * keys(s) for s in kinds.values())  # boolean
        rope = sum(2 * chunk * s.head_dim * DTYPE_BYTES for s in kinds.values())  # cos and sin
        # after its update a sliding layer keeps window - 1 + chunk positions until the next step trims them
        overhang = sum((min(tokens, c.window - 1 + chunk) - c.positions(tokens)) * c.bytes_per_position
                       for c in self.layers if c.kind == "sliding")
        return masks + rope + overhang + max(self._layer_bytes(s, chunk, keys(s)) for s in self.shapes)

    def _layer_bytes(self, shape, chunk: int, keys: int) -> int:
        """The largest phase of one decoder layer on `chunk` tokens whose queries attend over `keys` positions."""
        b, f, h, q = DTYPE_BYTES, FP32_BYTES, self.text.hidden_size, shape.heads * shape.head_dim
        repeated = 2 * keys * q * b if 1 < shape.kv_heads < shape.heads else 0  # repeat_kv's copies of K and V
        return max(
            chunk * b * (3 * h + 3 * shape.intermediate),  # MLP: input, residual, normed; act(gate), up, product
            chunk * (2 * b * h + 2 * f * h),  # an RMSNorm of the residual stream in fp32: copy and result
            chunk * (2 * b * h + b * q + 2 * f * q),  # q_norm: q, its fp32 copy and the fp32 result
            chunk * (2 * b * h + 2 * b * q + b * keys) + repeated,  # attention: q, output, the bf16 mask; K/V copies
        )

    def workspace_bytes(self) -> int:
        per_weight = {"bf16": 0, "int8": 2 * DTYPE_BYTES, "int4": 1 + 2 * DTYPE_BYTES}[self.quant]
        return FIXED_WORKSPACE + self.dequant_bytes * per_weight

    def total_bytes(self, tokens: int) -> int:
        return self.weights_bytes + self.kv_cache_bytes(tokens) + self.activation_bytes(tokens) + self.workspace_bytes()

    def max_context(self, gpu_bytes: int) -> int:
        """Largest sequence length whose total fits in `gpu_bytes` (0 if not even one token), capped."""
        if self.total_bytes(1) > gpu_bytes:
            return 0
        lo, hi = 1, self.max_positions  # total_bytes grows with the length: bisect for the last that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.total_bytes(mid) <= gpu_bytes else (lo, mid - 1)
        return lo

    def media_tokens(self, image_tokens: int, audio_seconds: float) -> tuple[int, int]:
        """Sequence positions taken by one image and one audio clip, their begin / end markers included."""
        samples = getattr(self.audio_config, "audio_samples_per_token", None) or 640
        audio = math.ceil(audio_seconds * SAMPLE_RATE / samples)
        return image_tokens + 2 * (image_tokens > 0), audio + 2 * (audio > 0)


def make_plan(backbone: str, quant: str = "bf16", gpu_gb: float = 16, context: int = 8192, image_tokens: int = 0,
              audio_seconds: float = 0, quant_group_size: int = 64, prefill_chunk: int = PREFILL_CHUNK) -> dict:
    """Everything the CLI prints, as a dict (all sizes in bytes)."""
    planner = MemoryPlanner(load_config(backbone), quant, quant_group_size, prefill_chunk)
    image, audio = planner.media_tokens(image_tokens, audio_seconds)
    tokens = context + image + audio
    gpu = int(gpu_gb * GIB)
    parts = dict(weights_bytes=planner.weights_bytes, kv_cache_bytes=planner.kv_cache_bytes(tokens),
                 activation_bytes=planner.activation_bytes(tokens), workspace_bytes=planner.workspace_bytes())
    total = sum(parts.values())
    max_context = planner.max_context(gpu)
    return dict(backbone=backbone, quant=quant, quant_group_size=quant_group_size, prefill_chunk=prefill_chunk,
                gpu_gb=gpu_gb, gpu_bytes=gpu,
                parameters=planner.parameters, context=context, image_tokens=image, audio_tokens=audio,
                sequence_tokens=tokens, **parts, total_bytes=total, fits=total <= gpu, spare_bytes=gpu - total,
                max_context=max_context, max_position_embeddings=planner.max_positions,
                kv_layers=_describe_layers(planner.layers))


def _describe_layers(layers: list[CacheLayer]) -> list[dict]:
    groups: dict[CacheLayer, int] = {}
    for layer in layers:
        groups[layer] = groups.get(layer, 0) + 1
    return [dict(**asdict(c), layers=n, bytes_per_token=c.bytes_per_position) for c, n in groups.items()]


def format_plan(p: dict) -> str:
    group = f" (group {p['quant_group_size']})" if p["quant"] == "int4" else ""
    lines = [f"memory plan: backbone={p['backbone']} quant={p['quant']}{group}, batch 1, "
             f"{p['parameters'] / 1e9:.2f}B parameters",
             f"sequence: {p['context']} text + {p['image_tokens']} image + {p['audio_tokens']} audio "
             f"= {p['sequence_tokens']} tokens (image and audio counts include their 2 marker tokens)",
             f"{'':12s}{'GiB':>8s}  {'bytes':>16s}"]
    for name, key in (("weights", "weights_bytes"), ("KV cache", "kv_cache_bytes"),
                      ("activations", "activation_bytes"), ("workspace", "workspace_bytes"), ("total", "total_bytes")):
        lines.append(f"{name:12s}{p[key] / GIB:8.2f}  {p[key]:16,d}")
    for c in p["kv_layers"]:
        window = f", window {c['window']}" if c["window"] else ""
        heads = f"{c['kv_heads']} KV head{'s' * (c['kv_heads'] > 1)} x head_dim {c['head_dim']}{window}"
        rule = (f"{c['bytes_per_token'] / 1024:g} KiB per token ({heads})" if c["kind"] != "shared"
                else "no cache (reuses an earlier layer's)")
        lines.append(f"  KV: {c['layers']} {c['kind']} layers, {rule}")
    gpu = f"{p['gpu_gb']:g} GB"
    lines.append(f"fits in {gpu} with {p['spare_bytes'] / GIB:.2f} GiB to spare" if p["fits"] else
                 f"does not fit in {gpu}: needs {p['total_bytes'] / GIB:.2f} GiB "
                 f"({-p['spare_bytes'] / GIB:.2f} GiB over)")
    cap = " (capped at max_position_embeddings)" if p["max_context"] == p["max_position_embeddings"] else ""
    lines.append(f"max context: {p['max_context']} tokens, image and audio included{cap}")
    if p["sequence_tokens"] > p["max_position_embeddings"]:
        lines.append(f"note: {p['sequence_tokens']} tokens exceed the model's max_position_embeddings "
                     f"({p['max_position_embeddings']})")
    chunk = f"min(S, {p['prefill_chunk']})" if p["prefill_chunk"] else "all S"
    lines.append(f"estimates: activations = the prefill's peak at {chunk} tokens (masks, RoPE tables, sliding-window "
                 "overhang + one layer's largest phase; measured in bench/activation_memory.py); workspace = 1 GiB "
                 "CUDA context/allocator + the largest dequantised Linear (int8/int4); GB read as GiB")
    return "\n".join(lines)

