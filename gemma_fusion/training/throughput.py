"""Per-step cost metrics: model FLOPs of a training step, MFU, peak memory.

Model FLOPs of a step count the work the model needs, not what the hardware did (activation
recomputation is not counted), from the backbone's analytical forward FLOPs (`models/flops.py`) over
the batch's real tokens (padding excluded; packed rows by segment). Training multiplies them by:
  * 2 for the frozen weight matmuls and the LM head (forward + gradient of the input; a frozen weight
    gets no weight gradient),
  * 3 for attention (forward + gradients of Q, K and V) and for LoRA (forward + input and weight grads).
The projectors (a few matmuls per soft token) are not counted.

MFU = model FLOPs per second / the device's peak: dense bf16 tensor-core TFLOP/s of known NVIDIA cards
(`logger.peak_tflops` overrides it, e.g. for another precision or card; on the CPU MFU is logged only
when it is set).
"""
from __future__ import annotations

import resource
import sys

import torch

from gemma_fusion.models.flops import backbone_forward_flops

# Dense bf16 TFLOP/s by device-name fragment, most specific first.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("B200", 2250.0),
                    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("RTX 4090", 165.0), ("A6000", 155.0))


def device_peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The peak this device's MFU is measured against; None when unknown (MFU is then not logged)."""
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for fragment, peak in PEAK_BF16_TFLOPS if fragment in name), None)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated device memory (CUDA), or the process's peak resident memory (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports kB


class StepFlops:
    """Model FLOPs of one training step of a FusionModel on a batch (see the module docstring)."""

    def __init__(self, text_config, decoder=None):
        self.config, self.decoder = text_config, decoder
        try:
            one = backbone_forward_flops(text_config, 1, 1)
        except ValueError:  # a model type without a config formula: count its Linear layers
            one = backbone_forward_flops(text_config, 1, 1, decoder=decoder)
            self.config_only = False
        else:
            self.config_only = True
        with_lora = backbone_forward_flops(text_config, 1, 1, decoder=decoder) if decoder is not None else one
        self.linear_per_token = one["linear"]
        self.lora_per_token = with_lora.get("lora", 0)
        self.head_per_target = one["lm_head"]
        self._attention: dict[int, int] = {}

    def attention(self, length: int) -> int:
        if length not in self._attention:
            flops = backbone_forward_flops(self.config, length, 0, decoder=None if self.config_only else self.decoder)
            self._attention[length] = flops["attention"]
        return self._attention[length]

    def __call__(self, batch: dict, num_targets: int) -> float:
        mask = batch["attention_mask"]
        if "segment_ids" in batch:  # packed rows: attention stays inside each segment
            segments = batch["segment_ids"][mask.bool()]
            rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask.bool()]
            _, lengths = torch.unique(torch.stack((rows, segments)), dim=1, return_counts=True)
        else:
            lengths = mask.sum(1)
        lengths = [int(n) for n in lengths.tolist() if n]
        tokens = sum(lengths)
        return float(2 * (tokens * self.linear_per_token + num_targets * self.head_per_target)
                     + 3 * (sum(self.attention(n) for n in lengths) + tokens * self.lora_per_token))
