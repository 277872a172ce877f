"""The export format: what `python -m gemma_fusion.export` writes (see gemma_fusion/inference/export.py),
read back by `load_export` into a FusionModel.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch import nn

from gemma_fusion.artifacts.rundir import ExportDir
from gemma_fusion.core.config import check_targets
from gemma_fusion.core.errors import UserError
from gemma_fusion.models.backbone import (DTYPES, check_remote_code_consent, load_backbone, meta_model, read_backbone_spec,
                                          remote_code_options, split_full_model)
from gemma_fusion.models.fusion import FusionModel
from gemma_fusion.models.quant import QuantizedLinear
log = logging.getLogger(__name__)
FORMAT = "gemma_fusion.export/1"
GEMMA4_EMBEDDERS = {"vision": "model.embed_vision.", "audio": "model.embed_audio."}


def quantized_weight_names(quantized: dict) -> list[str]:
    """The full-precision names a quantised layer does not store (`P.weight`, `P.bias`)."""
    return [f"{name}.{k}" for name in quantized for k in ("weight", "bias")]


def check_loaded(full: nn.Module, quantized: dict, what: str) -> None:
    """Every weight of `full` has been given a value (none is left on the meta device)."""
    skipped = set(quantized_weight_names(quantized))
    left = [n for n, t in (*full.named_parameters(), *full.named_buffers())
            if t.is_meta and n not in skipped and n not in dict(full.named_non_persistent_buffers())]
    if left:
        raise UserError(f"export: {what} has no value for the backbone's weights {left[:3]} (an unusual checkpoint "
                        "layout); please report it with the backbone's config.json.")


def load_export(path: str | Path, trust_remote_code: bool = False):
    """An export directory -> (FusionModel, the run's config with backbone.path = path); `trust_remote_code`:
    see `restore.check_remote_code_consent`."""
    path = Path(path).expanduser()
    meta = read_export_meta(path)
    cfg = OmegaConf.create(meta["config"])
    check_targets(cfg, source=str(ExportDir(path).meta))  # before anything is imported or built from it
    check_remote_code_consent(cfg, f"run={path}", trust_remote_code)
    cfg.backbone.path = str(path)
    if meta["quant"] == "none":
        loaded = load_backbone(path, meta["dtype"], cfg.backbone.attn_implementation,
                               **remote_code_options(cfg.backbone))
    else:
        spec = read_backbone_spec(path, **remote_code_options(cfg.backbone))
        full = quantized_model(path, spec, meta, DTYPES[meta["dtype"]], cfg.backbone.attn_implementation)
        loaded = split_full_model(full, spec)
    model = FusionModel.from_loaded(loaded, cfg.model.get("vision"), cfg.model.get("audio"),
                                    bidirectional_image=cfg.model.bidirectional_image,
                                    bidirectional_audio=cfg.model.bidirectional_audio, init_from_checkpoint=False,
                                    saved=True)
    out = ExportDir(path)
    state = load_file(str(out.projectors))
    result = model.load_state_dict(state, strict=False)
    extra = [k for k in result.missing_keys if k.startswith(("vision.", "audio."))]
    if result.unexpected_keys or extra:
        raise UserError(f"{out.projectors} does not fit the projectors {out.meta.name} describes "
                        f"(missing {extra[:3]}, unexpected {result.unexpected_keys[:3]}); re-export the run.")
    model.requires_grad_(False)
    return model.eval(), cfg


def read_export_meta(path: Path) -> dict:
    meta_path = ExportDir(path).meta
    if not meta_path.is_file():
        raise UserError(f"{path} has no {meta_path.name}; pass a directory written by `python -m gemma_fusion.export`.")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise UserError(f"{meta_path} has format {meta.get('format')!r}, not {FORMAT!r}; re-export with this version.")
    return meta


def quantized_model(path: Path, spec, meta: dict, dtype: torch.dtype, attn_implementation: str) -> nn.Module:
    """The whole transformers model with its quantised Linear layers rebuilt from the stored int8 / int4
    tensors: built on the meta device, so no full-precision copy of a quantised weight is ever allocated."""
    spec.config._attn_implementation = attn_implementation
    full = meta_model(spec.config, dtype)
    weights = ExportDir(path).model
    tensors = load_file(str(weights))
    for name, info in meta["quantized"].items():
        parent, _, child = name.rpartition(".")
        stored = {k: tensors.pop(f"{name}.{k}", None) for k in ("qweight", "scale", "bias")}
        setattr(full.get_submodule(parent), child, QuantizedLinear.from_stored(
            stored["qweight"], stored["scale"], stored["bias"], info["in_features"], info["bits"], info["group_size"]))
    for key, buffer in list(full.named_non_persistent_buffers()):  # rotary frequencies, embedding scale
        owner, _, name = key.rpartition(".")
        if buffer.is_meta:
            full.get_submodule(owner)._buffers[name] = torch.empty_like(buffer, device="cpu")
    for owner in {k.rpartition(".")[0] for k, b in full.named_non_persistent_buffers()}:
        full._init_weights(full.get_submodule(owner))  # recomputes them (the weights there are loaded next)
    result = full.load_state_dict(tensors, strict=False, assign=True)
    full.tie_weights()
    left = [n for n, t in (*full.named_parameters(), *full.named_buffers()) if t.is_meta]
    if left or result.unexpected_keys:
        raise UserError(f"{weights} does not fit its config.json (not loaded: {left[:3]}, "
                        f"unexpected: {result.unexpected_keys[:3]}); re-export the run.")
    return full.eval()

