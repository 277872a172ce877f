"""Hydra/OmegaConf glue: the `${project_root:}` resolver, the resolved config as plain YAML, command-line checks
and the `_target_` policy.

A config may come from someone else (a downloaded run's saved config, an export's metadata), so it is data
that must never reach an arbitrary function or class. `check_targets` lets a `_target_` stand only at the root
of a component node (COMPONENTS: model.vision, model.audio, trainer.strategy) and name only a class that
implements the projector contract (a subclass of `Buildable`) or, at trainer.strategy, one of the Lightning
strategies in STRATEGIES: what the object is decides, never how its dotted path is spelt. Only modules of
gemma_fusion, lightning and the packages a user names in $GEMMA_FUSION_TARGETS (the shell decides, never a
config file) are imported to find out; anything else is refused unimported.
"""
from __future__ import annotations

import importlib
import os
import re
from collections.abc import Mapping
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import BooleanNode, DictConfig, FloatNode, IntegerNode, ListConfig, OmegaConf

from gemma_fusion.core.errors import UserError
from gemma_fusion.core.schema import SCHEMAS, check, schema_of

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = str(PROJECT_ROOT / "configs")

if not OmegaConf.has_resolver("project_root"):
    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))
for _name, _schema in SCHEMAS.items():  # train.yaml / eval.yaml list these first: every group is typed by them
    ConfigStore.instance().store(name=_name, node=_schema)


def to_plain(cfg):
    """Resolved config as plain Python types (safe for YAML, JSON and `torch.load(weights_only=True)`);
    a value that is not a config node (a string, a number) comes back unchanged."""
    if not OmegaConf.is_config(cfg):
        return cfg
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def save_yaml(cfg: DictConfig, path: str | Path) -> None:
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.create(to_plain(cfg))))


def _groups() -> set[str]:
    root = Path(CONFIG_DIR)
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir()}


def check_cli_overrides(config_name: str, argv: list[str]) -> None:
    """Stop with one sentence when a `key=value` override names a key the config lacks (naming the valid keys),
    or gives a number or a switch a value of another type (`trainer.max_steps=abc`).

    Hydra's own message for an unknown key ("Key 'x' is not in struct") does not say what would have been
    valid, and a wrong type would only surface as a traceback deep in Lightning. Group choices
    (`model/vision=foo`) are left to Hydra, whose message lists the available options.
    """
    overrides = [a for a in argv if "=" in a and not a.startswith(("-", "+", "~"))]
    groups = _groups()
    group_overrides = [a for a in overrides if a.split("=", 1)[0] in groups]
    values = [a for a in overrides if a.split("=", 1)[0] not in groups and not a.startswith("hydra")]
    if not values:
        return
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name, overrides=group_overrides)
        parsed = OverridesParser.create().parse_overrides(values)
    except Exception:  # a bad group choice or bad syntax: Hydra reports it with the available options
        return
    for override in parsed:
        key = override.key_or_group
        node, path = cfg, []
        for part in key.split("."):
            if not isinstance(node, DictConfig) or part not in node.keys():  # (`in` is False for ??? values)
                where = ".".join(path) or "the top level"
                valid = ", ".join(sorted(node.keys())) if isinstance(node, DictConfig) else "(none: it is a value)"
                raise SystemExit(f"error: unknown config option '{key}'; valid keys under {where}: {valid} "
                                 "(use +key=value to add a new one).")
            node, path = node._get_node(part), path + [part]
        if not override.is_sweep_override():
            _check_type(key, node, override.value())


def _check_type(key: str, node, value) -> None:
    """A number or a switch stays one (ints are accepted for floats), a group of keys stays a group, null only
    where the schema allows it; ${...} is left to the config."""
    if isinstance(value, str) and value.startswith("${"):
        return
    if isinstance(node, DictConfig) and value is not None and not isinstance(value, dict):
        keys = list(node.keys())
        raise SystemExit(f"error: {key} holds several keys ({', '.join(keys)}); set one of them, e.g. "
                         f"{key}.{keys[0]}={value}.")
    default = node._value()
    kinds = {bool: ("true or false", (bool,)), int: ("an integer", (int,)), float: ("a number", (int, float))}
    kind = {IntegerNode: int, FloatNode: float, BooleanNode: bool}.get(type(node), type(default))  # typed: also null
    shown = "null" if default is None else str(default).lower() if kind is bool else default
    if value is None:
        if kind in kinds and not node._is_optional():
            raise SystemExit(f"error: {key}=null is not allowed: it must be {kinds[kind][0]} (its default is {shown}).")
        return
    if kind in kinds and (not isinstance(value, kinds[kind][1]) or (kind is not bool and isinstance(value, bool))):
        raise SystemExit(f"error: {key}={value} is not {kinds[kind][0]} (its default is {shown}).")


def check_values(cfg: DictConfig) -> None:
    """Every key in its type and range, by the rules of its schema (gemma_fusion/core/schema.py); a batch size
    of 0 would loop forever gathering an empty batch."""
    check(cfg, schema_of(cfg))


class Buildable:
    """Marker of the classes a config may build by `_target_`: the projector contracts
    (gemma_fusion/models/projectors/base.py) inherit it, so any design implementing them qualifies."""


# The config nodes that may name a class to build, by their key in the composed config; a `_target_` anywhere
# else (inside a projector's arguments, inside FSDP's options) is refused.
COMPONENTS = ("model.vision", "model.audio", "trainer.strategy")
# The only classes a config may build besides Buildable's subclasses: Lightning strategies, by identity, at
# trainer.strategy (their options are plain data that gemma_fusion/training/fsdp.py turns into objects).
STRATEGIES = ("lightning.pytorch.strategies.DDPStrategy", "lightning.pytorch.strategies.FSDPStrategy")
STRATEGY_NODE = "trainer.strategy"
TARGETS_ENV = "GEMMA_FUSION_TARGETS"
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def own_packages() -> tuple[str, ...]:
    """Top-level packages a `_target_` may be imported from: gemma_fusion, lightning (its strategies) and those
    listed in $GEMMA_FUSION_TARGETS (a user's own designs; the shell decides, never a run's files)."""
    extra = (name.strip() for name in os.environ.get(TARGETS_ENV, "").split(","))
    return ("gemma_fusion", "lightning", *(name for name in extra if name))


def _allowed_text(where: str) -> str:
    strategies = f", or at {STRATEGY_NODE} one of {', '.join(STRATEGIES)}" if where == STRATEGY_NODE else ""
    return (f"a config may build only a projector class (one implementing the contract of "
            f"gemma_fusion/models/projectors/base.py){strategies}; to use a design of your own, subclass the "
            f"contract in your package and allow it on the command line with {TARGETS_ENV}=your_package")


def check_target(path: object, where: str):
    """The class that `path`, the `_target_` of the component node `where` (e.g. `model.vision`), names; stops
    with one sentence unless it is a subclass of Buildable or, at trainer.strategy, one of STRATEGIES.

    What the object is decides, never how its path is spelt (`gemma_fusion.core.config.os.system` is a
    function reached through an allowed module). Only modules of own_packages() are imported to find out.
    """
    key = f"{where}._target_={path}"
    if where not in COMPONENTS:
        raise UserError(f"{key} is not allowed: a _target_ may only head one of {', '.join(COMPONENTS)}, never sit "
                        "inside their arguments or elsewhere in a config.")
    if not importable(path, own_packages()):
        raise UserError(f"{key} is not allowed: {_allowed_text(where)}.")
    target = locate(path)
    if target is None:
        raise UserError(f"{key} cannot be imported; check the dotted path (package.module.Class).")
    if isinstance(target, type) and issubclass(target, Buildable):
        return target
    if where == STRATEGY_NODE and any(target is locate(name) for name in STRATEGIES):
        return target
    kind = f"it is {target.__module__}.{target.__qualname__}" if isinstance(target, type) else \
        f"it is a {type(target).__name__}, not a class"
    raise UserError(f"{key} is not allowed ({kind}): {_allowed_text(where)}.")


def importable(path: object, packages: tuple[str, ...]) -> bool:
    """`path` is a dotted name (`package.module.Class`) whose top-level package is one of `packages`."""
    return isinstance(path, str) and bool(_DOTTED.fullmatch(path)) and path.split(".")[0] in packages


def locate(path: str):
    """The object a dotted path names (the longest importable module prefix, then attributes), or None.
    It imports modules: callers first make sure the path is `importable` from packages they trust."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            target = getattr(target, part, None)
        return target
    return None


def _target_nodes(node, where: str = ""):
    """(key of the node, its `_target_`) for every node holding a `_target_`, in plain containers."""
    if isinstance(node, Mapping):
        if "_target_" in node:
            yield where, node["_target_"]
        for key, value in node.items():
            if key != "_target_":
                yield from _target_nodes(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _target_nodes(value, f"{where}[{i}]")


def _resolved(node):
    """Plain containers of a config node, each value resolved where it resolves (left out where it does not:
    `???`, an interpolation that needs Hydra's runtime)."""
    if isinstance(node, DictConfig):
        keys, get = node.keys(), node.__getitem__
    elif isinstance(node, ListConfig):
        keys, get = range(len(node)), node.__getitem__
    else:
        return node
    out = {}
    for key in keys:
        try:
            out[key] = _resolved(get(key))
        except Exception:  # the written value is checked instead
            continue
    return out if isinstance(node, DictConfig) else list(out.values())


def check_targets(cfg, where: str = "", source: str = "") -> None:
    """The `_target_` policy on a config (a DictConfig or plain containers) whose key is `where` ("" for a whole
    composed config): `_target_` only at the root of COMPONENTS, each naming an allowed class (`check_target`).

    Run before anything is imported or built from a config: a run's saved config, an export's metadata and
    command-line overrides. Both the written values and, where they resolve, the resolved ones are checked
    (a resolver such as `oc.decode` could turn a string into a node). `source` (the file the config came from)
    heads the message.
    """
    views = [OmegaConf.to_container(cfg, resolve=False), _resolved(cfg)] if OmegaConf.is_config(cfg) else [cfg]
    try:
        for view in views:
            for key, path in _target_nodes(view, where):
                check_target(path, key)
    except UserError as err:
        if not source:
            raise
        raise UserError(f"{source}: {err}") from None


def checked_instantiate(node, where: str, **kwargs):
    """The object a component node (`model.vision`, `trainer.strategy`) builds, after `check_targets`: the one
    way gemma_fusion turns config into objects. Non-recursive: the node's arguments reach the class as data;
    `kwargs` (built objects, or values that override the node's) reach it as they are."""
    check_targets(node, where)
    return instantiate(node, _recursive_=False, _partial_=True)(**kwargs)
