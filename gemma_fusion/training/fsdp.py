"""FSDP units for a frozen low-precision backbone with full-precision trainable parts.

FSDP flattens the parameters of a unit into one tensor, which must have one dtype: a bf16 decoder layer
cannot share a unit with its fp32 LoRA adapters, nor the bf16 embeddings with the fp32 projectors. So
every module whose own parameters all train (LoRA's A and B, the projectors' layers and position
tables) becomes a unit of its own, and each decoder layer a unit for its frozen weights; the rest
(embeddings, final norm) stays in the root unit.
"""
from __future__ import annotations

from hydra.utils import get_class
from torch import nn
from torch.distributed.fsdp.wrap import CustomPolicy

from gemma_fusion.core.config import check_target


def trains_alone(module: nn.Module) -> bool:
    """The module has parameters of its own and all of them train."""
    own = list(module.parameters(recurse=False))
    return bool(own) and all(p.requires_grad for p in own)


def auto_wrap_policy(layer_classes: list[str]) -> CustomPolicy:
    """One FSDP unit per decoder layer (`layer_classes`: dotted class paths), per trainable module and per
    frozen encoder tower of a projector (`keep_frozen`)."""
    for path in layer_classes:
        check_target(path, "trainer.strategy.auto_wrap_policy.layer_classes")
    classes = tuple(get_class(path) for path in layer_classes)
    return CustomPolicy(lambda module: isinstance(module, classes) or trains_alone(module)
                        or getattr(module, "keep_frozen", False))  # a frozen fp32 encoder tower: its own unit
