"""FSDP units for a frozen low-precision backbone with full-precision trainable parts, and the Trainer's
strategy built from plain config data (configs/trainer/*.yaml).

FSDP flattens the parameters of a unit into one tensor, which must have one dtype: a bf16 decoder layer
cannot share a unit with its fp32 LoRA adapters, nor the bf16 embeddings with the fp32 projectors. So
every module whose own parameters all train (LoRA's A and B, the projectors' layers and position
tables) becomes a unit of its own, and each decoder layer a unit for its frozen weights; the rest
(embeddings, final norm) stays in the root unit.

A config names no function and no nested `_target_` (gemma_fusion/core/config.py): `trainer.strategy` may
name a strategy class, and FSDP's `auto_wrap_policy` and `mixed_precision` are plain data that
`build_strategy` turns into the objects FSDPStrategy takes.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecision
from torch.distributed.fsdp.wrap import CustomPolicy

from gemma_fusion.core.config import (STRATEGY_NODE, check_targets, checked_instantiate, importable, locate,
                                      own_packages, to_plain)
from gemma_fusion.core.errors import UserError
from gemma_fusion.models.projectors.base import Projector

LAYER_CLASSES = f"{STRATEGY_NODE}.auto_wrap_policy.layer_classes"
MIXED_PRECISION = f"{STRATEGY_NODE}.mixed_precision"


def trains_alone(module: nn.Module) -> bool:
    """The module has parameters of its own and all of them train."""
    own = list(module.parameters(recurse=False))
    return bool(own) and all(p.requires_grad for p in own)


def layer_class(path: object) -> type[nn.Module]:
    """The decoder-layer class a `layer_classes` entry names: a torch.nn.Module subclass of transformers or of a
    package a `_target_` may come from (only used in isinstance checks; nothing else is imported)."""
    packages = ("transformers", *own_packages())
    allowed = f"name a torch.nn.Module subclass of {', '.join(packages)} (a decoder layer class)"
    if not importable(path, packages):
        raise UserError(f"{LAYER_CLASSES}={path} is not allowed: {allowed}.")
    cls = locate(path)
    if cls is None:
        raise UserError(f"{LAYER_CLASSES}={path} cannot be imported; check the dotted path (package.module.Class).")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__.split(".")[0] in packages):
        raise UserError(f"{LAYER_CLASSES}={path} is not allowed: {allowed}.")
    return cls


def auto_wrap_policy(layer_classes: list[str]) -> CustomPolicy:
    """One FSDP unit per decoder layer (`layer_classes`: dotted class paths), per trainable module and per
    frozen encoder tower of a projector (its `frozen_modules()`)."""
    classes = tuple(layer_class(path) for path in layer_classes)
    towers: set[int] = set()  # FSDP visits modules parent first: a projector before its frozen towers

    def is_unit(module: nn.Module) -> bool:
        if isinstance(module, Projector):
            towers.update(id(tower) for tower in module.frozen_modules())
        return isinstance(module, classes) or trains_alone(module) or id(module) in towers  # fp32 tower: own unit

    return CustomPolicy(is_unit)


def mixed_precision(options: Mapping) -> MixedPrecision:
    """torch's FSDP MixedPrecision from plain data: `param_dtype`, `reduce_dtype`, `buffer_dtype` by name
    (`bfloat16`, `float32`); an empty mapping casts nothing (each parameter keeps its own dtype)."""
    dtypes = {}
    for key, name in options.items():
        if key not in ("param_dtype", "reduce_dtype", "buffer_dtype"):
            raise UserError(f"{MIXED_PRECISION}.{key} is not an option; set param_dtype, reduce_dtype or "
                            "buffer_dtype (a dtype name such as bfloat16), or leave it empty to cast nothing.")
        dtype = getattr(torch, str(name), None) if name is not None else None
        if name is not None and not isinstance(dtype, torch.dtype):
            raise UserError(f"{MIXED_PRECISION}.{key}={name} is not a torch dtype name (e.g. bfloat16, float32).")
        dtypes[key] = dtype
    return MixedPrecision(**dtypes)


def build_strategy(node):
    """`trainer.strategy` -> what lightning.Trainer takes: a name (`ddp`, `auto`) as it is, or a node naming a
    strategy class (`_target_`, checked by core/config.py) whose `auto_wrap_policy: {layer_classes: [...]}` and
    `mixed_precision: {...}` are built here."""
    if not isinstance(node, Mapping):
        return node
    options = dict(node)
    if "_target_" not in options:
        raise UserError(f"{STRATEGY_NODE} holds options ({', '.join(map(str, options))}) but no _target_; name "
                        "the strategy class (e.g. lightning.pytorch.strategies.FSDPStrategy) or a name like ddp.")
    check_targets(options, STRATEGY_NODE)  # before anything is imported for it
    objects = {}
    policy = options.get("auto_wrap_policy")
    if isinstance(policy, Mapping):
        if list(policy) != ["layer_classes"]:
            raise UserError(f"{STRATEGY_NODE}.auto_wrap_policy holds {', '.join(map(str, policy))}; it takes only "
                            "layer_classes (a list of decoder layer classes, e.g. [transformers.models.llama."
                            "modeling_llama.LlamaDecoderLayer]).")
        layers = options.pop("auto_wrap_policy")["layer_classes"]
        objects["auto_wrap_policy"] = auto_wrap_policy([layers] if isinstance(layers, str) else list(layers))
    if isinstance(options.get("mixed_precision"), Mapping):
        objects["mixed_precision"] = mixed_precision(options.pop("mixed_precision"))
    return checked_instantiate(options, STRATEGY_NODE, **objects)


def trainer_options(trainer) -> dict:
    """The keyword arguments of lightning.Trainer from `cfg.trainer` (plain values; the strategy built)."""
    options = to_plain(trainer)
    if "strategy" in options:
        options["strategy"] = build_strategy(options["strategy"])
    return options
