"""Hydra/OmegaConf glue: the `${project_root:}` resolver, the resolved config as plain YAML, command-line checks
and the `_target_` allowlist.

A config can name Python objects (`_target_`, FSDP's `layer_classes`), and a config may come from someone
else (a downloaded run directory's config.yaml). `check_targets` lets it name classes of the libraries
gemma_fusion configures and anything of gemma_fusion itself; functions of other packages (`os.system`,
`torch.load`, `transformers.AutoModel.from_pretrained`) are refused. Users who write their own projector
module allow its package with the environment variable GEMMA_FUSION_TARGETS (the shell decides, not a
config file).
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from gemma_fusion.core.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = str(PROJECT_ROOT / "configs")

if not OmegaConf.has_resolver("project_root"):
    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))


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
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

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
    """A number or a switch stays one (ints are accepted for floats), a group of keys stays a group; null and
    ${...} are left to the config."""
    if value is None or (isinstance(value, str) and value.startswith("${")):
        return
    if isinstance(node, DictConfig) and not isinstance(value, dict):
        keys = list(node.keys())
        raise SystemExit(f"error: {key} holds several keys ({', '.join(keys)}); set one of them, e.g. "
                         f"{key}.{keys[0]}={value}.")
    default = node._value()
    kinds = {bool: ("true or false", (bool,)), int: ("an integer", (int,)), float: ("a number", (int, float))}
    kind = type(default)
    if kind in kinds and (not isinstance(value, kinds[kind][1]) or (kind is not bool and isinstance(value, bool))):
        shown = str(default).lower() if kind is bool else default
        raise SystemExit(f"error: {key}={value} is not {kinds[kind][0]} (its default is {shown}).")


# key -> (kind, test, what it must be); null passes only for the keys marked nullable
_NUMBER_RULES = {
    "data.batch_size": (int, lambda v: v >= 1, "an integer >= 1"),
    "data.eval_batch_size": (int, lambda v: v >= 1, "an integer >= 1"),
    "data.image_tokens": (int, lambda v: v >= 1, "an integer >= 1 (soft tokens per image)"),
    "data.num_workers": (int, lambda v: v >= 0, "an integer >= 0"),
    "data.shuffle_buffer": (int, lambda v: v >= 0, "an integer >= 0"),
    "data.bucket_batches": (int, lambda v: v >= 1, "an integer >= 1"),
    "data.pack_length": (int, lambda v: v >= 0, "an integer >= 0 (0: no packing)"),
    "data.max_batch_tokens": (int, lambda v: v >= 1, "null or an integer >= 1"),
    "data.max_length": (int, lambda v: v >= 1, "null or an integer >= 1"),
    "data.max_train_shards": (int, lambda v: v >= 1, "null or an integer >= 1"),
    "data.cache_gb": (float, lambda v: v >= 0, "a number >= 0"),
    "data.audio_max_seconds": (float, lambda v: v > 0, "null or a number > 0"),
    "data.max_bad_fraction": (float, lambda v: 0 <= v <= 1, "a number from 0 to 1"),
    "data.bad_check_after": (int, lambda v: v >= 0, "an integer >= 0"),
    "data.max_image_megapixels": (float, lambda v: v > 0, "a number > 0"),
    "optim.warmup_steps": (int, lambda v: v >= 0, "an integer >= 0"),
    "optim.schedule_steps": (int, lambda v: v >= 1, "null or an integer >= 1"),
    "optim.weight_decay": (float, lambda v: v >= 0, "a number >= 0"),
    "optim.max_nonfinite_skips": (int, lambda v: v >= 0, "an integer >= 0"),
    "lora.r": (int, lambda v: v >= 0, "an integer >= 0 (0: no adapters)"),
    "checkpoint.every_n_steps": (int, lambda v: v >= 0, "an integer >= 0 (0: no checkpoints)"),
    "trainer.max_steps": (int, lambda v: v >= 1 or v == -1, "an integer >= 1 (or -1 with trainer.max_epochs)"),
}
_ABSENT = object()
_NULLABLE = {"data.max_batch_tokens", "data.max_length", "data.max_train_shards", "data.audio_max_seconds",
             "optim.schedule_steps", "lora.r"}


def check_values(cfg: DictConfig) -> None:
    """Sizes, counts and rates in range (a batch size of 0 would loop forever gathering an empty batch)."""
    checks = dict(_NUMBER_RULES)
    lr = OmegaConf.select(cfg, "optim.lr")
    for part in lr if OmegaConf.is_dict(lr) else ():
        checks[f"optim.lr.{part}"] = (float, lambda v: v >= 0, "a number >= 0 (0 freezes that part)")
    for key, (kind, test, rule) in checks.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT or (value is None and key in _NULLABLE):
            continue
        kinds = (int,) if kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not test(value):
            raise UserError(f"{key}={value} is out of range: it must be {rule}.")


class Buildable:
    """Marker of the classes a config may build by `_target_`: the projector contracts
    (gemma_fusion/models/projectors/base.py) inherit it, so any design implementing them qualifies."""


CLASS_PACKAGES = ("lightning", "torch", "transformers", "peft")  # classes only: their functions load and run things
TARGETS_ENV = "GEMMA_FUSION_TARGETS"


def own_packages() -> tuple[str, ...]:
    """Packages whose functions a config may call: gemma_fusion and those listed in $GEMMA_FUSION_TARGETS."""
    extra = (name.strip() for name in os.environ.get(TARGETS_ENV, "").split(","))
    return ("gemma_fusion", *(name for name in extra if name))


def check_target(path: object, where: str) -> None:
    """Stop with one sentence unless `path` names a class of CLASS_PACKAGES or anything of own_packages()."""
    own, top = own_packages(), str(path).split(".")[0]
    allowed = (f"configs may name classes of {', '.join(CLASS_PACKAGES)} and anything of {', '.join(own)} "
               f"(set {TARGETS_ENV}=your_package to allow your own module)")
    if not isinstance(path, str) or top not in own + CLASS_PACKAGES:
        raise UserError(f"{where}={path} is not allowed: {allowed}.")
    target = _locate(path)
    if target is None:
        raise UserError(f"{where}={path} cannot be imported; check the dotted path (module.Class).")
    if top not in own and not isinstance(target, type):
        raise UserError(f"{where}={path} is not a class: {allowed}.")


def _locate(path: str):
    """The object a dotted path names (the longest importable module prefix, then attributes), or None."""
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


def check_targets(node, where: str = "") -> None:
    """`check_target` on every `_target_` inside a config (a DictConfig or plain containers)."""
    if OmegaConf.is_config(node):
        node = OmegaConf.to_container(node, resolve=False)
    if isinstance(node, Mapping):
        for key, value in node.items():
            path = f"{where}.{key}" if where else str(key)
            if key == "_target_":
                check_target(value, path)
            else:
                check_targets(value, path)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            check_targets(value, f"{where}[{i}]")


def checked_instantiate(node, where: str, **kwargs):
    """hydra.utils.instantiate after `check_targets`: the one way gemma_fusion turns config into objects."""
    from hydra.utils import instantiate

    check_targets(node, where)
    return instantiate(node, **kwargs)
