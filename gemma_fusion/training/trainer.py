"""The Lightning Trainer of a run and what its strategy asks of the model: `cfg.trainer` (+ loggers, callbacks,
atomic checkpoints, SLURM) -> `lightning.Trainer`; a setting Lightning rejects is one sentence."""
from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, Strategy
from omegaconf import DictConfig

from gemma_fusion.core.errors import UserError
from gemma_fusion.training.callbacks import build_loggers
from gemma_fusion.training.checkpointing import AtomicCheckpointIO, slurm_environment
from gemma_fusion.training.fsdp import trainer_options


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: list) -> L.Trainer:
    """The Lightning Trainer of `cfg.trainer` (its strategy built by training/fsdp.py) logging into `run_dir`;
    a setting Lightning rejects (`trainer.precision=fp8`, `trainer.accelerator=gpu` without one) is one sentence."""
    options = trainer_options(cfg.trainer)
    try:
        return L.Trainer(**options, default_root_dir=run_dir, logger=build_loggers(cfg, run_dir), callbacks=callbacks,
                         enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                         plugins=[p for p in (AtomicCheckpointIO(), slurm_environment()) if p is not None])
    except (MisconfigurationException, ValueError, TypeError) as err:
        raise UserError(f"trainer: Lightning rejects these settings ({err}); check the trainer.* values.") from err


def runs_idle_projectors(strategy: Strategy) -> bool:
    """Every rank must run every projector (on a dummy input when its batch lacks that modality): FSDP gathers each
    unit's weights with a collective all ranks join, and DDP expects a gradient for every trainable parameter
    (also with `trainer.devices=N` alone)."""
    return isinstance(strategy, (FSDPStrategy, DDPStrategy))


def is_sharded(strategy: Strategy) -> bool:
    """The live model is sharded across ranks (FSDP): a whole copy must be loaded to use it after training."""
    return isinstance(strategy, FSDPStrategy)


def planned_world_size(trainer_cfg: DictConfig) -> int:
    """devices x num_nodes when both are numbers (for the too-few-shards warning); 1 when unknown ('auto')."""
    try:
        return max(1, int(trainer_cfg.get("devices", 1))) * max(1, int(trainer_cfg.get("num_nodes", 1)))
    except (TypeError, ValueError):
        return 1
