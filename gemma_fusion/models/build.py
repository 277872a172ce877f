"""A trainable FusionModel from the composed Hydra config: backbone, projectors (assembled by
`FusionModel.from_loaded`), LoRA, what trains, quantisation, checkpointing, compilation."""
from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig
from torch.utils.checkpoint import checkpoint

from gemma_fusion.models.backbone import load_backbone, remote_code_options
from gemma_fusion.core.errors import UserError
from gemma_fusion.models.fusion import FusionModel
from gemma_fusion.models.quant import quantize_frozen
from gemma_fusion.models.lora import add_lora
from gemma_fusion.models.trainable import set_trainable

log = logging.getLogger(__name__)


def build_model(cfg: DictConfig, saved: bool = False) -> FusionModel:
    """The model `cfg` describes, ready to train (`saved`: `cfg` is a trained run's config, loaded again)."""
    quant = cfg.backbone.get("quant") or "none"
    if quant != "none" and cfg.lora.get("merge"):
        raise UserError(f"lora.merge=true cannot fold adapters into a backbone.quant={quant} base (the merged weights "
                        "would be rounded again); train with lora.merge=false and merge at export time.")
    loaded = load_backbone(cfg.backbone.path, cfg.backbone.dtype, cfg.backbone.attn_implementation,
                           **remote_code_options(cfg.backbone))
    model = FusionModel.from_loaded(loaded, cfg.model.get("vision"), cfg.model.get("audio"),
                                    bidirectional_image=cfg.model.bidirectional_image,
                                    bidirectional_audio=cfg.model.bidirectional_audio, saved=saved)
    if cfg.lora.get("r"):
        add_lora(loaded.backbone.decoder, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout,
                 cfg.lora.target_modules, cfg.lora.get("use_dora", False))
    set_trainable(model)
    quantize_frozen(loaded.backbone.decoder, quant, cfg.backbone.get("quant_group_size", 64),
                    cfg.backbone.get("quant_backend", "native"))
    if cfg.model.get("gradient_checkpointing"):
        checkpoint_layers(loaded.backbone.decoder)
    if cfg.model.get("compile"):
        compile_layers(loaded.backbone.decoder, cfg.model.get("compile_mode"))
    return model


def checkpoint_layers(decoder) -> int:
    """Activation checkpointing on every decoder layer: activations are recomputed in backward.

    transformers only checkpoints layers of a model in train mode; the frozen backbone stays in eval
    mode (dropout off), so the layers' forward is wrapped here instead. Returns the number of layers.
    """
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"{type(decoder).__name__} has no .layers to checkpoint; set model.gradient_checkpointing=false.")
    for layer in layers:
        def forward(*args, _inner=layer.forward, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)
        layer.forward = forward
    return len(layers)


def compile_layers(decoder, mode: str | None = None) -> int:
    """torch.compile each decoder layer in place (regional compilation: one graph per layer type, compiled
    once and reused by every layer of that type; the projectors and the loss stay eager). Returns the count."""
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"{type(decoder).__name__} has no .layers to compile; set model.compile=false.")
    for layer in layers:
        layer.compile(mode=mode, dynamic=True)  # dynamic: batches change length from step to step
    log.info("model.compile: %d decoder layers compiled with torch.compile (mode=%s)", len(layers), mode)
    return len(layers)
