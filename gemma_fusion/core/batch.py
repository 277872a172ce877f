"""The batch contract between data/ and models/: token types, the ignored label, special tokens, and which keys
of a batch are the model's.

A batch is a plain dict (what DataLoaders move between processes) typed as `Batch`. The loader adds
bookkeeping keys (`meta`, `stats`, `position`) that the model never sees: `model_inputs(batch)` is the one
place that drops them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypedDict

import torch

IGNORE_INDEX = -100  # labels that carry no loss (prompt, padding, soft tokens)
TEXT, IMAGE, AUDIO = 0, 1, 3  # transformers' mm_token_type_ids values
SAMPLE_RATE = 16_000  # Hz: every waveform is resampled to it before it is framed into soft tokens

MODEL_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_position_ids", "input_features",
              "input_features_mask", "labels", "position_ids", "mm_token_type_ids", "segment_ids")
LOADER_KEYS = ("meta", "stats", "position")  # our loader's bookkeeping
PROCESSOR_KEYS = ("token_type_ids", "num_soft_tokens_per_image")  # transformers' processor adds them; unused


class Batch(TypedDict, total=False):
    """One collated batch (gemma_fusion/data/collate.py writes it; shapes there)."""

    input_ids: torch.Tensor            # B, S
    attention_mask: torch.Tensor       # B, S
    labels: torch.Tensor               # B, S (IGNORE_INDEX off target)
    mm_token_type_ids: torch.Tensor    # B, S (TEXT / IMAGE / AUDIO)
    pixel_values: torch.Tensor         # N_img, P, D (uint8 from our preprocessing)
    image_position_ids: torch.Tensor   # N_img, P, 2 (padding -1)
    input_features: torch.Tensor       # N_aud, T, F
    input_features_mask: torch.Tensor  # N_aud, T
    position_ids: torch.Tensor         # B, S (packed rows only)
    segment_ids: torch.Tensor          # B, S (packed rows only)
    meta: list[dict[str, Any]]         # one entry per sample: key, task, prompt, target, url, index, modality
    stats: dict                        # the loader's skip counts
    position: dict                     # the stream position for exact resume


def model_inputs(batch: Batch | dict) -> dict[str, torch.Tensor]:
    """The keys FusionModel.forward takes; the loader's bookkeeping left out."""
    return {k: v for k, v in batch.items() if k in MODEL_KEYS}


@dataclass
class SpecialTokens:
    """Token ids the sequence builder needs. Markers are lists (one id for Gemma 4, several for text markers)."""

    bos: int | None
    eos: int
    pad: int
    image_start: list[int]
    image_end: list[int]
    image_token: int
    audio_start: list[int]
    audio_end: list[int]
    audio_token: int
