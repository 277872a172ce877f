"""Model FLOPs of a training step: real tokens only, packed segments attend within themselves."""
from __future__ import annotations

import pytest
import torch

from gemma_fusion.core.batch import IGNORE_INDEX
from gemma_fusion.data.pipeline import make_loader, run_preprocessor
from gemma_fusion.models.build import build_model
from gemma_fusion.models.flops import backbone_forward_flops
from gemma_fusion.training.throughput import StepFlops, device_peak_tflops


class Recording:
    """The run's preprocessing, noting each sample's token and target counts as it leaves preprocessing (before
    any batching, padding or packing) under its key."""

    def __init__(self, preprocess):
        self.preprocess, self.tokens, self.seen = preprocess, preprocess.tokens, {}

    def __call__(self, raw: dict) -> dict:
        sample = self.preprocess(raw)
        targets = sum(label != IGNORE_INDEX for label in sample["labels"][1:])
        self.seen[sample["key"]] = (len(sample["input_ids"]), targets)
        return sample


def _step_flops_of_samples(config, decoder, samples: list[tuple[int, int]]) -> float:
    """The module docstring's step FLOPs summed over samples each taken alone, without padding or neighbours:
    2 x (weight matmuls + LM head at the targets) + 3 x (attention + LoRA)."""
    total = 0.0
    for tokens, targets in samples:
        alone = backbone_forward_flops(config, tokens, targets, decoder=decoder)
        total += 2 * (alone["linear"] + alone["lm_head"]) + 3 * (alone["attention"] + alone["lora"])
    return total


@pytest.mark.parametrize("pack_length", [0, 160])
def test_a_real_batch_costs_what_its_samples_cost_alone(make_cfg, pack_length):
    """Padded rows (pack_length 0) and packed rows of the demo's loader: the step's FLOPs are those of its samples
    each run alone, counted from the samples' own lengths, not from the batch's mask or segments."""
    cfg = make_cfg("lora=qv_r8", f"data.pack_length={pack_length}")
    model = build_model(cfg)
    recording = Recording(run_preprocessor(model, cfg.data))
    flops = StepFlops(model.backbone.text_config, model.backbone.decoder)
    checked = 0
    for batch in make_loader(cfg.data, recording, train=True):
        samples = [recording.seen[m["key"]] for m in batch["meta"]]
        if pack_length:  # several samples share a row, each attending only within itself
            assert batch["input_ids"].shape[0] < len(samples)
        else:
            assert (batch["attention_mask"] == 0).any()  # rows of different lengths: padding is in the batch
        targets = sum(t for _, t in samples)
        expected = _step_flops_of_samples(model.backbone.text_config, model.backbone.decoder, samples)
        assert flops(batch, targets) == pytest.approx(expected, rel=1e-12)
        checked += 1
        if checked == 3:
            break
    assert checked == 3


def test_peak_is_known_only_when_it_can_be():
    assert device_peak_tflops(torch.device("cpu")) is None
    assert device_peak_tflops(torch.device("cpu"), 2.5) == 2.5
