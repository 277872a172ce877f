"""RUN/compute.json: what a design costs, so that comparisons between designs are compute-honest.

- parameters per part (vision, audio, lora, backbone), trainable and frozen; a quantised frozen layer
  counts its weights (in x out), whatever their storage;
- soft tokens: per image, per second of audio, per sample;
- forward FLOPs per sample, projector/encoder and backbone apart: the projectors are counted by
  `FlopCounterMode` while they run on real samples (as preprocessed for this model), the backbone by
  its analytical count (`models/flops.py`) over each sample's real length and target tokens.

Measured on up to `max_samples` samples of the validation data (the same preprocessing as training).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from gemma_fusion.artifacts.rundir import RunDir
from gemma_fusion.core.errors import UserError
from gemma_fusion.models.flops import backbone_forward_flops, count_forward_flops
from gemma_fusion.core.batch import AUDIO, IGNORE_INDEX, IMAGE, SAMPLE_RATE
from gemma_fusion.models.fusion import pixels_to_unit
from gemma_fusion.models.quant import QuantizedLinear
from gemma_fusion.models.trainable import PARTS, clean_name, part_of

log = logging.getLogger(__name__)


def parameter_counts(model: nn.Module) -> dict[str, dict[str, int]]:
    """{part: {"trainable": n, "frozen": n}}; quantised layers (buffers, not parameters) count their weights."""
    counts = {part: {"trainable": 0, "frozen": 0} for part in PARTS}
    for name, param in model.named_parameters():
        counts[part_of(clean_name(name))]["trainable" if param.requires_grad else "frozen"] += param.numel()
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            counts[part_of(clean_name(name) + ".weight")]["frozen"] += module.in_features * module.out_features
    return counts


@torch.no_grad()
def measure(model, loader, max_samples: int = 32, max_batches: int = 100) -> dict:
    """Soft tokens and forward FLOPs per sample, read until `max_samples` samples of each modality the model
    takes were seen (or the data, or `max_batches`, ran out): data sorted by task still gives both."""
    text_config = model.backbone.text_config
    totals = dict(samples=0, images=0, image_samples=0, image_tokens=0, audio_seconds=0.0, audio_samples=0,
                  audio_tokens=0, tokens=0, vision=0, audio=0, backbone=0)
    for batches, batch in enumerate(loader, 1):
        mask, labels = batch["attention_mask"], batch["labels"]
        for length, row in zip(mask.sum(1).tolist(), labels):
            targets = int((row[1:] != IGNORE_INDEX).sum())
            totals["backbone"] += backbone_forward_flops(text_config, int(length), targets)["total"]
        totals["tokens"] += int(mask.sum())
        totals["samples"] += mask.shape[0]
        pixels = batch.get("pixel_values")
        if model.vision is not None and pixels is not None and pixels.numel():
            positions = batch["image_position_ids"]
            pixels = pixels_to_unit(pixels) if not pixels.is_floating_point() else pixels
            totals["vision"] += count_forward_flops(model.vision.soft_tokens, pixels, positions)
            totals["images"] += pixels.shape[0]
            totals["image_samples"] += int((batch["mm_token_type_ids"] == IMAGE).any(1).sum())
            totals["image_tokens"] += int((positions != -1).all(-1).sum())
        frames = batch.get("input_features")
        if model.audio is not None and frames is not None and frames.numel():
            frame_mask = batch.get("input_features_mask")
            totals["audio"] += count_forward_flops(model.audio.soft_tokens, frames, frame_mask)
            real = int(frame_mask.sum()) if frame_mask is not None else frames.shape[0] * frames.shape[1]
            totals["audio_tokens"] += real
            totals["audio_seconds"] += real * model.audio.frame_dim / SAMPLE_RATE
            totals["audio_samples"] += int((batch["mm_token_type_ids"] == AUDIO).any(1).sum())
        enough = [totals["image_samples"] >= max_samples] if model.vision is not None else []
        enough += [totals["audio_samples"] >= max_samples] if model.audio is not None else []
        if all(enough) or batches >= max_batches:
            break
    n = max(1, totals["samples"])
    flops = {part: totals[part] / n for part in ("vision", "audio", "backbone")}
    flops["total"] = sum(flops.values())
    return {
        "samples_measured": {"all": totals["samples"], "with_image": totals["image_samples"],
                             "with_audio": totals["audio_samples"]},
        "tokens": {
            "per_sample": totals["tokens"] / n,
            "per_image": totals["image_tokens"] / totals["images"] if totals["images"] else None,
            "per_audio_second": SAMPLE_RATE / model.audio.frame_dim if model.audio is not None else None,
        },
        "forward_flops_per_sample": flops,  # over the measured mix of samples
        "forward_flops_per_unit": {
            "vision_per_image": totals["vision"] / totals["images"] if totals["images"] else None,
            "audio_per_second": totals["audio"] / totals["audio_seconds"] if totals["audio_seconds"] else None,
            "backbone_per_token": totals["backbone"] / max(1, totals["tokens"]),
        },
    }


def compute_report(model, loader, designs: dict, max_samples: int = 32) -> dict:
    """The figures of RUN/compute.json (see the module docstring)."""
    return {"designs": designs, "parameters": parameter_counts(model), **measure(model, loader, max_samples)}


def write_compute_report(run_dir: Path, report: dict) -> Path:
    path = RunDir(run_dir).write_compute(report)
    flops = report["forward_flops_per_sample"]
    log.info("compute: %.3g forward FLOPs per sample (vision %.3g, audio %.3g, backbone %.3g) -> %s",
             flops["total"], flops["vision"], flops["audio"], flops["backbone"], path)
    return path


MATCH_MODES = ("none", "flops", "tokens")


def matched_steps(report: dict, mode: str, budget: float | None, batch_size: int) -> int | None:
    """Training steps that spend `budget` for this design: training FLOPs (3 x forward FLOPs per sample x
    samples) with mode `flops`, soft + text tokens with mode `tokens`; None for mode `none`."""
    if mode not in MATCH_MODES:
        raise UserError(f"compute.match={mode} is not one of {', '.join(MATCH_MODES)}.")
    if mode == "none":
        return None
    if not budget or budget <= 0:
        raise UserError(f"compute.match={mode} needs compute.budget (training {mode}, e.g. compute.budget=1e15).")
    per_sample = 3 * report["forward_flops_per_sample"]["total"] if mode == "flops" else report["tokens"]["per_sample"]
    steps = max(1, round(budget / (per_sample * batch_size)))
    report["matched"] = {"mode": mode, "budget": budget, "per_sample": per_sample, "max_steps": steps}
    log.info("compute.match=%s: %d steps spend %.3g %s (%.3g per sample, batch %d)", mode, steps, budget, mode,
             per_sample, batch_size)
    return steps


def flat_metrics(report: dict) -> dict[str, float]:
    """The report as flat `compute/...` numbers, for loggers."""
    out = {}
    for part, counts in report["parameters"].items():
        for kind, n in counts.items():
            out[f"compute/params_{part}_{kind}"] = float(n)
    flops = {f"flops_{k}": v for group in ("forward_flops_per_sample", "forward_flops_per_unit")
             for k, v in report[group].items()}
    for key, value in {**report["tokens"], **flops}.items():
        if value is not None:
            out[f"compute/{key}"] = float(value)
    return out
