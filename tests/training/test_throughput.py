"""Model FLOPs of a training step: real tokens only, packed segments attend within themselves."""
from __future__ import annotations

import torch

from gemma_fusion.models.flops import backbone_forward_flops
from gemma_fusion.models.tiny import tiny_gemma4_config
from gemma_fusion.training.throughput import StepFlops, device_peak_tflops


def _expected(config, lengths, targets):
    linear = sum(backbone_forward_flops(config, n, 0)["linear"] for n in lengths)
    attention = sum(backbone_forward_flops(config, n, 0)["attention"] for n in lengths)
    head = backbone_forward_flops(config, 1, targets)["lm_head"]
    return 2 * (linear + head) + 3 * attention


def test_padding_is_free_and_packed_segments_count_separately():
    config = tiny_gemma4_config(hidden_size=64, num_hidden_layers=6, sliding_window=8).text_config
    flops = StepFlops(config)
    padded = {"attention_mask": torch.tensor([[1] * 20 + [0] * 12, [1] * 32])}
    assert flops(padded, 5) == _expected(config, [20, 32], 5)
    packed = {"attention_mask": torch.tensor([[1] * 30 + [0] * 2]),
              "segment_ids": torch.tensor([[0] * 12 + [1] * 18 + [0] * 2])}
    assert flops(packed, 5) == _expected(config, [12, 18], 5)
    assert flops(packed, 5) < flops({"attention_mask": packed["attention_mask"]}, 5)  # 12^2 + 18^2 < 30^2


def test_peak_is_known_only_when_it_can_be():
    assert device_peak_tflops(torch.device("cpu")) is None
    assert device_peak_tflops(torch.device("cpu"), 2.5) == 2.5
