"""A projector from its config node (`model/vision=…`, `model/audio=…`): the checked `_target_`, `null` arguments
filled from the checkpoint, and the checkpoint's own embedder weights loaded where the shapes fit."""
from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping

from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue
from torch import nn

from gemma_fusion.core.config import check_target, checked_instantiate
from gemma_fusion.core.errors import UserError

log = logging.getLogger(__name__)
# The design of Gemma 4's own embedders (`embed_vision` / `embed_audio`): what a checkpoint's projectors are
NATIVE = {"vision": {"_target_": "gemma_fusion.models.projectors.PatchEmbedder"},
          "audio": {"_target_": "gemma_fusion.models.projectors.AudioFrameProjector"}}


def build_projector(node: Mapping | None, hidden: int, ckpt_args: dict, ckpt_state: dict | None,
                    name: str, saved: bool = False) -> nn.Module | None:
    """Instantiate a projector config (None or a node without `_target_`: no projector).

    `null` arguments take the checkpoint's value (`ckpt_args`, what the checkpoint says about its own
    embedder; see `filled_nulls`); `out_dim` defaults to the backbone's `hidden` width. With
    `init_from_checkpoint: true` (the default) the checkpoint's embedder weights (`ckpt_state`) are loaded
    when their shapes fit. `saved`: the config of a saved run (see `filled_nulls`).
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
    args = filled_nulls(args, ckpt_args, check_target(args["_target_"], f"model.{name}"), name, saved)
    projector = checked_instantiate(args, f"model.{name}", out_dim=out_dim)
    if from_ckpt and ckpt_state is not None:
        shapes = {k: v.shape for k, v in projector.state_dict().items()}
        if shapes == {k: v.shape for k, v in ckpt_state.items()}:
            projector.load_state_dict(ckpt_state)
            log.info("model/%s initialised from the checkpoint's embedder", name)
        else:
            log.warning("model/%s does not have the checkpoint's embedder shapes; it starts from random init", name)
    elif ckpt_state is not None and not projector.gemma4_native:
        log.info("model/%s (%s) starts from random init; the checkpoint's own %s embedder is not used (the Gemma 4 "
                 "design, model/%s=%s, starts from it)", name, type(projector).__name__, name, name,
                 "patch_ef" if name == "vision" else "audio_frames")
    return projector


def filled_nulls(args: dict, ckpt_args: dict, design: type, name: str, saved: bool = False) -> dict:
    """`args` with each `null` argument replaced by the checkpoint's value (`ckpt_args`: a Gemma 4 checkpoint's
    embedder geometry). A null the checkpoint cannot fill stays null where the design's constructor defaults it to
    None (the design says what null means, e.g. `hidden_dim`: out_dim); where the constructor has a value of its
    own the run stops with one sentence: the YAMLs promise the checkpoint's figure (posemb_size 1120), not the
    class default (64), and falling back silently would train another design than the config says. `saved`: the config of
    a run trained already, loaded again: such a null takes the constructor's default, as it did when runs made before
    this rule were trained (a new run cannot have one)."""
    params = inspect.signature(design.__init__).parameters
    unfilled = []
    for key, value in list(args.items()):
        if value is not None:
            continue
        if key in ckpt_args:
            args[key] = ckpt_args[key]
        elif key not in params:
            del args[key]  # not an argument of this design: the constructor never sees it
        elif params[key].default is not None:
            if saved:
                del args[key]
            else:
                unfilled.append(key)
    if unfilled:
        keys = [f"model.{name}.{key}" for key in unfilled]
        example = " ".join(f"{k}={'N' if params[key].default is inspect.Parameter.empty else params[key].default}"
                           for k, key in zip(keys, unfilled))
        one = len(keys) == 1
        raise UserError(f"{', '.join(keys)} {'is' if one else 'are'} null and the backbone gives no value for "
                        f"{'it' if one else 'them'} (only a Gemma 4 checkpoint with a {name} config does); set "
                        f"{'it' if one else 'them'}, e.g. {example} (the design's own "
                        f"default{'' if one else 's'}).")
    return args
