"""Collate preprocessed samples (or packed rows of them) into one right-padded FusionModel batch.

Signature :: list of samples --> input_ids / labels / attention_mask / mm_token_type_ids [B, S],
pixel_values [N_img, P_max, D] (uint8 from our preprocessing) with image_position_ids [N_img, P_max, 2]
(padding -1), input_features [N_aud, T_max, F] with input_features_mask [N_aud, T_max]; for packed rows
(`batching.merge_row`) also position_ids and segment_ids [B, S] (0 on padding). `meta` lists every
sample of the batch, packed ones included, in row order.
"""
from __future__ import annotations

import torch

from gemma_fusion.core.batch import IGNORE_INDEX


META_KEYS = ("key", "task", "prompt", "target", "url", "index")


def modality(sample: dict) -> str:
    """Which media a sample carries: 'image', 'audio', 'image+audio' or 'text'."""
    kinds = [name for name, key in (("image", "images"), ("audio", "audio")) if sample[key]]
    return "+".join(kinds) or "text"


def _pad_stack(tensors: list[torch.Tensor], value) -> torch.Tensor:
    """Stack [L_i, ...] tensors into [N, max L_i, ...], padding with `value`."""
    out = tensors[0].new_full((len(tensors), max(t.shape[0] for t in tensors), *tensors[0].shape[1:]), value)
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]] = t
    return out


def collate(samples: list[dict], pad_id: int) -> dict:
    batch = {
        "input_ids": _pad_stack([torch.tensor(s["input_ids"]) for s in samples], pad_id),
        "labels": _pad_stack([torch.tensor(s["labels"]) for s in samples], IGNORE_INDEX),
        "attention_mask": _pad_stack([torch.ones(len(s["input_ids"]), dtype=torch.long) for s in samples], 0),
        "mm_token_type_ids": _pad_stack([torch.tensor(s["mm_token_type_ids"]) for s in samples], 0),
    }
    images = [im for s in samples for im in s["images"]]
    if images:
        batch["pixel_values"] = _pad_stack([pv for pv, _ in images], 0.0)
        batch["image_position_ids"] = _pad_stack([pos for _, pos in images], -1)
    clips = [clip for s in samples for clip in s["audio"]]
    if clips:
        batch["input_features"] = _pad_stack(clips, 0.0)
        batch["input_features_mask"] = _pad_stack([torch.ones(len(c), dtype=torch.bool) for c in clips], False)
    if any("segment_ids" in s for s in samples):
        batch["position_ids"] = _pad_stack([torch.tensor(s.get("position_ids", range(len(s["input_ids"]))))
                                            for s in samples], 0)
        batch["segment_ids"] = _pad_stack([torch.tensor(s.get("segment_ids", [1] * len(s["input_ids"])))
                                           for s in samples], 0)
    batch["meta"] = [{**{k: part.get(k) for k in META_KEYS}, "modality": modality(part)}
                     for s in samples for part in s.get("parts", [s])]
    return batch
