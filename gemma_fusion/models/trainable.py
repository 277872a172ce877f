"""What trains and what stays frozen, decided in one place, logged with parameter counts per part."""
from __future__ import annotations

import logging

import torch
from torch import nn

from gemma_fusion.models.projectors.base import Projector

log = logging.getLogger(__name__)
PARTS = ("vision", "audio", "lora", "backbone")
# Wrappers that FSDP, activation checkpointing and torch.compile put into parameter names
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """A parameter's name as the unwrapped model knows it (and as checkpoints and state dicts store it)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def trainable_names(model: nn.Module) -> set[str]:
    return {clean_name(n) for n, p in model.named_parameters() if p.requires_grad}


def part_of(name: str) -> str:
    """Which part a parameter belongs to: 'vision', 'audio', 'lora' or 'backbone'."""
    if name.startswith("vision."):
        return "vision"
    if name.startswith("audio."):
        return "audio"
    return "lora" if "lora_" in name else "backbone"


def set_trainable(model: nn.Module) -> dict[str, dict[str, int]]:
    """Projectors and LoRA train; the backbone is frozen, and so is every part a projector lists in
    `frozen_modules()` (a pretrained encoder tower used as is). Returns and logs counts per part."""
    counts = {p: {"trainable": 0, "total": 0} for p in PARTS}
    kept = {id(p) for projector in model.modules() if isinstance(projector, Projector)
            for frozen in projector.frozen_modules() for p in frozen.parameters()}
    for name, param in model.named_parameters():
        part = part_of(name)
        param.requires_grad_(part != "backbone" and id(param) not in kept)
        counts[part]["total"] += param.numel()
        counts[part]["trainable"] += param.numel() if param.requires_grad else 0
    for part, c in counts.items():
        if c["total"]:
            tag = "[TRAINABLE]" if c["trainable"] else "[Frozen]   "
            log.info("%s %-8s %12s / %12s parameters", tag, part, f"{c['trainable']:,}", f"{c['total']:,}")
    return counts


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only what trains (projectors + adapters): the frozen backbone is never copied."""
    return {clean_name(n): p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
