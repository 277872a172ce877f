"""Hydra/OmegaConf glue: the `${project_root:}` resolver and the resolved config as plain YAML."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(PROJECT_ROOT / "configs")

if not OmegaConf.has_resolver("project_root"):
    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))


def to_plain(cfg: DictConfig) -> dict:
    """Resolved config as plain Python types (safe for YAML, JSON and `torch.load(weights_only=True)`)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def save_yaml(cfg: DictConfig, path: str | Path) -> None:
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.create(to_plain(cfg))))
