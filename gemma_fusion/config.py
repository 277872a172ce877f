"""Hydra/OmegaConf glue: the `${project_root:}` resolver and the resolved config as plain YAML."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[1]
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
    """Stop with one sentence naming the valid keys when a `key=value` override names a key the config lacks.

    Hydra's own message for that case ("Key 'x' is not in struct") does not say what would have been valid.
    Group choices (`model/vision=foo`) are left to Hydra, whose message lists the available options.
    """
    from hydra import compose, initialize_config_dir

    overrides = [a for a in argv if "=" in a and not a.startswith(("-", "+", "~"))]
    groups = _groups()
    group_overrides = [a for a in overrides if a.split("=", 1)[0] in groups]
    keys = [a.split("=", 1)[0] for a in overrides
            if a.split("=", 1)[0] not in groups and not a.startswith("hydra")]
    if not keys:
        return
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name, overrides=group_overrides)
    except Exception:  # a bad group choice: Hydra reports it with the available options
        return
    for key in keys:
        node, path = cfg, []
        for part in key.split("."):
            if not isinstance(node, DictConfig) or part not in node.keys():  # (`in` is False for ??? values)
                where = ".".join(path) or "the top level"
                valid = ", ".join(sorted(node.keys())) if isinstance(node, DictConfig) else "(none: it is a value)"
                raise SystemExit(f"error: unknown config option '{key}'; valid keys under {where}: {valid} "
                                 "(use +key=value to add a new one).")
            node, path = node._get_node(part), path + [part]
