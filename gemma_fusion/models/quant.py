"""Weight-only quantisation of the frozen backbone: int8 per output row, or int4 per group of inputs.

`backbone.quant=int8|int4` replaces every frozen `nn.Linear` of the decoder (peft's LoRA layers keep
their adapters and wrap the quantised base) after the adapters are injected, so LoRA trains in full
precision on top of a base that costs 1 byte (int8) or 0.5 byte (int4) per weight plus its scales.
Embeddings, norms, the LM head and the projectors stay in `backbone.dtype`.

Two backends:
- `native` (default): pure torch, runs on CPU and CUDA. Storage is exact and countable (the memory
  planner relies on it): int8 = out x in bytes + one scale per output row; int4 = out x in / 2 bytes
  (two values per byte) + one scale per `group_size` inputs of every row; scales in the weight's dtype.
  Forward dequantises one layer's weight at a time to that dtype and runs a plain matmul.
- `torchao`: torchao's weight-only tensor subclasses (`Int8WeightOnlyConfig`, `Int4WeightOnlyConfig`),
  with its fused kernels where they exist; int4 needs torchao's CUDA kernels.

Symmetric rounding to nearest: a weight w of a row (int8) or group (int4) with absolute maximum m is
stored as round(w / s) with s = m / 127 (int8) or m / 7 (int4).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from gemma_fusion.core.errors import UserError

log = logging.getLogger(__name__)
QUANT_CHOICES = ("none", "int8", "int4")
BACKENDS = ("native", "torchao")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit values [..., n] (n even, each in [-8, 7]) -> uint8 [..., n / 2]: even index low nibble."""
    u = (q + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n / 2] -> int8 [..., n] in [-8, 7]; inverse of `pack_int4`."""
    low = (packed & 0xF).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).flatten(-2)


class QuantizedLinear(nn.Module):
    """A frozen Linear stored as int8 (per output row) or packed int4 (per input group), dequantised in forward.

    Signature :: [..., in_features] --> [..., out_features]

    Args:
        linear: the full-precision layer to replace (its weight is read once, not kept).
        bits: 8 or 4.
        group_size: inputs sharing one scale (int4 only); rows are zero-padded to a whole number of groups.
    Holds buffers, not parameters: nothing here trains, and checkpoints (trainable-only) never contain it.
    """

    def __init__(self, linear: nn.Linear, bits: int, group_size: int = 64):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits={bits}: only 8 and 4 are supported")
        weight = linear.weight.detach()
        self.in_features, self.out_features, self.bits = linear.in_features, linear.out_features, bits
        w = weight.float()
        if bits == 8:
            self.group_size = self.in_features
            scale = w.abs().amax(dim=1, keepdim=True) / 127
            q = torch.round(w / torch.where(scale == 0, 1.0, scale)).clamp(-127, 127).to(torch.int8)
        else:
            self.group_size = group_size
            padded = -(-self.in_features // group_size) * group_size
            w = F.pad(w, (0, padded - self.in_features)).view(self.out_features, -1, group_size)
            scale = w.abs().amax(dim=2, keepdim=True) / 7  # out, groups, 1
            q = torch.round(w / torch.where(scale == 0, 1.0, scale)).clamp(-8, 7).to(torch.int8)
            q = pack_int4(q.view(self.out_features, padded))
        self.register_buffer("qweight", q.contiguous(), persistent=False)
        self.register_buffer("scale", scale.squeeze(-1).to(weight.dtype).contiguous(), persistent=False)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        self.register_buffer("bias", bias, persistent=False)

    @classmethod
    def from_stored(cls, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, in_features: int,
                    bits: int, group_size: int) -> "QuantizedLinear":
        """The layer rebuilt from the tensors it stores (an exported checkpoint), without a full-precision weight."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features, layer.bits = in_features, qweight.shape[0], bits
        layer.group_size = in_features if bits == 8 else group_size
        layer.register_buffer("qweight", qweight, persistent=False)
        layer.register_buffer("scale", scale, persistent=False)
        layer.register_buffer("bias", bias, persistent=False)
        return layer

    def stored(self) -> dict[str, torch.Tensor]:
        """What `from_stored` needs back: qweight, scale and (if any) bias."""
        return {"qweight": self.qweight, "scale": self.scale, **({} if self.bias is None else {"bias": self.bias})}

    def dequantize(self) -> torch.Tensor:
        """The weight [out_features, in_features] in the original dtype (peft's DoRA reads it through this)."""
        if self.bits == 8:
            return self.qweight.to(self.scale.dtype) * self.scale[:, None]
        q = unpack_int4(self.qweight).view(self.out_features, -1, self.group_size)
        return (q.to(self.scale.dtype) * self.scale[..., None]).view(self.out_features, -1)[:, : self.in_features]

    @property
    def W_q(self) -> torch.Tensor:  # noqa: N802 -- the name peft looks for to call `dequantize()` (DoRA)
        return self.qweight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _DequantizedMatmul.apply(x.to(self.scale.dtype), self)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{group}"


class _DequantizedMatmul(torch.autograd.Function):
    """x @ W^T with W dequantised in forward and again in backward: autograd keeps no full-precision copy of
    W between the two (F.linear would save it, and a quantised backbone would then cost more than a bf16 one)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantize())

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return grad_out @ ctx.layer.dequantize().to(grad_out.dtype), None  # W is frozen: no weight gradient


def frozen_linears(module: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every plain nn.Linear under `module` whose weight does not train (LoRA's own A / B layers train)."""
    return [(name, m) for name, m in module.named_modules()
            if type(m) is nn.Linear and not m.weight.requires_grad]


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer under `module`, quantised storage counted as stored."""
    return sum(_nbytes(t) for t in (*module.parameters(), *module.buffers()))


def _nbytes(t: torch.Tensor) -> int:
    if hasattr(t, "__tensor_flatten__"):  # a tensor subclass (torchao): the tensors it is made of
        names, _ = t.__tensor_flatten__()
        return sum(_nbytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def quantize_frozen(module: nn.Module, quant: str, group_size: int = 64, backend: str = "native") -> int:
    """Quantise every frozen Linear under `module` in place; returns how many were replaced.

    Call after LoRA is injected and trainability is set: adapters and projectors are left alone.
    """
    if quant not in QUANT_CHOICES:
        raise UserError(f"backbone.quant={quant} is not supported; choose one of {', '.join(QUANT_CHOICES)}.")
    if backend not in BACKENDS:
        raise UserError(f"backbone.quant_backend={backend} is not supported; choose one of {', '.join(BACKENDS)}.")
    if quant == "none":
        return 0
    targets = frozen_linears(module)
    before = tensor_bytes(module)
    if backend == "torchao":
        _torchao_quantize(module, quant, group_size, {id(m) for _, m in targets})
    else:
        for name, linear in targets:
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent), child, QuantizedLinear(linear, 8 if quant == "int8" else 4,
                                                                         group_size))
    log.info("backbone.quant=%s (%s): %d frozen Linear layers quantised; decoder weights %.1f MB -> %.1f MB",
             quant, backend, len(targets), before / 2**20, tensor_bytes(module) / 2**20)
    return len(targets)


def _torchao_quantize(module: nn.Module, quant: str, group_size: int, target_ids: set[int]) -> None:
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_  # optional extra
    except ImportError as err:
        raise UserError("backbone.quant_backend=torchao needs torchao (pip install torchao); or use "
                        "backbone.quant_backend=native.") from err
    config = Int8WeightOnlyConfig() if quant == "int8" else Int4WeightOnlyConfig(group_size=group_size)
    try:
        quantize_(module, config, filter_fn=lambda m, fqn: id(m) in target_ids)
    except (ImportError, RuntimeError, NotImplementedError, ValueError) as err:
        raise UserError(f"torchao cannot quantise to {quant} here ({err}); use backbone.quant_backend=native, "
                        "which runs on any device.") from err
