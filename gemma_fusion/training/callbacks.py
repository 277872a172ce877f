"""Loggers, checkpointing and the final trainable-only export of a run directory."""
from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from omegaconf import DictConfig
from safetensors.torch import save_file

from gemma_fusion.config import to_plain
from gemma_fusion.training.trainable import trainable_state_dict


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    loggers = []
    if cfg.logger.get("csv", True):
        loggers.append(CSVLogger(save_dir=str(run_dir), name="", version=""))  # -> RUN/metrics.csv
    if cfg.logger.get("wandb", False):
        os.environ.setdefault("WANDB_MODE", "online" if os.environ.get("WANDB_API_KEY") else "offline")
        loggers.append(WandbLogger(project=cfg.logger.get("project", "gemma_fusion"), save_dir=str(run_dir),
                                   config=to_plain(cfg)))
    return loggers


def build_callbacks(cfg: DictConfig, run_dir: Path) -> list:
    every = cfg.checkpoint.get("every_n_steps", 0)
    if not every:
        return []
    return [ModelCheckpoint(dirpath=run_dir / "checkpoints", every_n_train_steps=every, save_top_k=-1,
                            filename="step-{step:07d}", auto_insert_metric_name=False)]


def save_final(model, run_dir: Path) -> Path:
    """RUN/final/trainable.safetensors: projectors + adapters, nothing of the frozen backbone."""
    path = run_dir / "final" / "trainable.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(trainable_state_dict(model), str(tmp))
    tmp.replace(path)
    return path
