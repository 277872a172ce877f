"""A projector from its config node (`model/vision=…`, `model/audio=…`): the checked `_target_`, `null` arguments
filled from the checkpoint, and the checkpoint's own embedder weights loaded where the shapes fit."""
from __future__ import annotations

import logging
from collections.abc import Mapping

from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue
from torch import nn

from gemma_fusion.core.config import checked_instantiate
from gemma_fusion.core.errors import UserError

log = logging.getLogger(__name__)
# The design of Gemma 4's own embedders (`embed_vision` / `embed_audio`): what a checkpoint's projectors are
NATIVE = {"vision": {"_target_": "gemma_fusion.models.projectors.PatchEmbedder"},
          "audio": {"_target_": "gemma_fusion.models.projectors.AudioFrameProjector"}}


def build_projector(node: Mapping | None, hidden: int, ckpt_args: dict, ckpt_state: dict | None,
                    name: str) -> nn.Module | None:
    """Instantiate a projector config (None or a node without `_target_`: no projector).

    `null` arguments take the checkpoint's value (`ckpt_args`, what the checkpoint says about its own
    embedder) or else the constructor's default; `out_dim` defaults to the backbone's `hidden` width. With
    `init_from_checkpoint: true` (the default) the checkpoint's embedder weights (`ckpt_state`) are loaded
    when their shapes fit.
    """
    if node is None or "_target_" not in node:
        return None
    try:
        args = OmegaConf.to_container(node, resolve=True, throw_on_missing=True) if OmegaConf.is_config(node) \
            else dict(node)
    except MissingMandatoryValue as err:
        raise UserError(f"model/{name}: {err.full_key} must be set (e.g. model.{name}.{err.full_key.split('.')[-1]}"
                        "=/path/to/it).") from err
    from_ckpt = args.pop("init_from_checkpoint", True)
    out_dim = args.pop("out_dim", None) or hidden  # FusionModel rejects a width that is not the backbone's
    for key, value in list(args.items()):
        if value is None:
            if key in ckpt_args:
                args[key] = ckpt_args[key]
            else:
                del args[key]
    projector = checked_instantiate(args, f"model.{name}", out_dim=out_dim)
    if from_ckpt and ckpt_state is not None:
        shapes = {k: v.shape for k, v in projector.state_dict().items()}
        if shapes == {k: v.shape for k, v in ckpt_state.items()}:
            projector.load_state_dict(ckpt_state)
            log.info("model/%s initialised from the checkpoint's embedder", name)
        else:
            log.warning("model/%s does not have the checkpoint's embedder shapes; it starts from random init", name)
    return projector
