"""Loggers, checkpointing and the final trainable-only export of a run directory."""
from __future__ import annotations

import csv
import os
import secrets
from pathlib import Path

import torch

from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig
from safetensors.torch import save_file

from gemma_fusion.artifacts.rundir import RunDir
from gemma_fusion.core.config import to_plain
from gemma_fusion.data.state import StatsTotals, StreamState, check_bad_fraction
from gemma_fusion.core.files import replaced_atomically
from gemma_fusion.models.trainable import trainable_names, trainable_state_dict


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    loggers = []
    if cfg.logger.get("csv", True):
        # -> RunDir.metrics, flushed every step so a killed run loses no logged row
        loggers.append(CSVLogger(save_dir=str(run_dir), name="", version="", flush_logs_every_n_steps=1))
    if cfg.logger.get("wandb", False):
        os.environ.setdefault("WANDB_MODE", "online" if os.environ.get("WANDB_API_KEY") else "offline")
        loggers.append(WandbLogger(project=cfg.logger.get("project", "gemma_fusion"), save_dir=str(run_dir),
                                   config=to_plain(cfg), id=wandb_run_id(run_dir), resume="allow"))
    return loggers


def wandb_run_id(run_dir: Path) -> str | None:
    """The wandb run id of RUN, kept in RUN/wandb_run_id: a resumed run continues the same wandb run.
    Only global rank 0 logs to wandb (and owns the file)."""
    if rank_zero_only.rank != 0:
        return None
    path = RunDir(run_dir).wandb_id
    if not path.is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(4))  # wandb's id alphabet: lowercase letters and digits
    return path.read_text().strip()


def set_aside_metrics(run_dir: Path) -> None:
    """Before a resumed run: keep RUN's metrics as a numbered segment (Lightning's CSV logger would delete them)."""
    run = RunDir(run_dir)
    if run.metrics.is_file():
        run.metrics.rename(run.next_metrics_segment())


def stitch_metrics(run_dir: Path) -> None:
    """After training: merge the segments of a resumed run into `RunDir.metrics`, one row per logged step.

    A segment's rows from the resumed step on were redone by the next segment, so they are dropped.
    """
    run = RunDir(run_dir)
    segments = run.metrics_segments() + [run.metrics]
    if len(segments) == 1 or not segments[-1].is_file():
        return
    tables = []
    for path in segments:
        with path.open(newline="") as f:
            tables.append(list(csv.DictReader(f)))
    rows = []
    for table, following in zip(tables, tables[1:] + [None]):
        start = min((int(r["step"]) for r in following if r.get("step")), default=None) if following else None
        rows += [r for r in table if start is None or not r.get("step") or int(r["step"]) < start]
    keys = sorted({k for r in rows for k in r})
    tmp = run.metrics.with_name(run.metrics.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(run.metrics)
    for path in segments[:-1]:
        path.unlink()


def build_callbacks(cfg: DictConfig, run_dir: Path) -> list:
    every = cfg.checkpoint.get("every_n_steps", 0)
    if not every:
        return []
    return [ModelCheckpoint(dirpath=RunDir(run_dir).checkpoints, every_n_train_steps=every, save_top_k=-1,
                            filename="step-{step:07d}", auto_insert_metric_name=False)]


def gathered_trainable(trainer, model) -> dict[str, torch.Tensor]:
    """The trainable weights, whole. Under FSDP every rank holds shards: they are gathered onto global rank 0
    (a collective: every rank must call this; the others get {}). Otherwise the model's own tensors."""
    if not isinstance(trainer.strategy, FSDPStrategy):
        return trainable_state_dict(model)
    keep = trainable_names(model)
    full = trainer.strategy.lightning_module_state_dict()  # "full" state dict type: rank 0 only, on the CPU
    return {k[len("net."):]: v.detach().cpu().contiguous() for k, v in full.items()
            if k.startswith("net.") and k[len("net."):] in keep}


def save_final(model, run_dir: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """The run's final weights (`RunDir.trainable`): projectors + adapters, nothing of the frozen backbone.

    Global rank 0 writes it; other data-parallel ranks hold the same weights and only return the path.
    `state`: the trainable tensors when they are not the model's own (gathered from FSDP shards).
    """
    run = RunDir(run_dir)
    path = run.trainable
    if rank_zero_only.rank != 0:
        return path
    with replaced_atomically(path, f"the checkpoints in {run.checkpoints} are intact: free space and "
                                   "finish with resume=auto") as tmp:
        save_file(trainable_state_dict(model) if state is None else state, str(tmp))
    return path


class DataBookkeeping(Callback):
    """Marks every trained batch in the `StreamState` (saved in checkpoints for exact resume), logs the
    loader's skipped-sample counts, and stops the run when the bad fraction passes `max_bad_fraction`.

    Lightning runs ModelCheckpoint after every other callback, so a checkpoint written at a step already
    holds that step's batch. Under DDP every rank's state is gathered into the checkpoint (rank 0 writes
    it) and each rank takes its own back on resume.
    """

    def __init__(self, state: StreamState, max_bad_fraction: float = 0.05, check_after: int = 200):
        self.state, self.totals = state, StatsTotals()
        self.max_bad_fraction, self.check_after = max_bad_fraction, check_after

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.state.mark(batch["meta"], batch.get("position"))
        self.totals.update(batch.get("stats"))
        skipped = self.totals.skipped
        metrics = {"data/skipped": float(sum(skipped.values())), "data/samples_ok": float(self.totals.ok)}
        metrics.update({f"data/skipped_{reason}": float(n) for reason, n in skipped.items()})
        pl_module.log_step(metrics)  # the step's row, written after every callback's on_train_batch_end
        # (each loader process checks its own samples too, so data where nothing passes stops before any batch)
        check_bad_fraction(skipped, self.totals.ok, self.max_bad_fraction, self.check_after)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.state.next_epoch()

    def state_dict(self) -> dict:
        ranks = [self.state.state_dict()]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, self.state.state_dict())
        return {"ranks": ranks}

    def load_state_dict(self, state_dict: dict) -> None:
        ranks = state_dict["ranks"]
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if len(ranks) == world:
            self.state.load_state_dict(ranks[rank])
            return
        seen: dict[str, list] = {}  # another world size: shards are dealt out anew, so filter by samples seen
        for r in ranks:
            for url, runs in r["seen"].items():
                seen.setdefault(url, []).extend(runs)
        self.state.load_state_dict({**ranks[0], "seen": seen, "layout": None})  # no layout matches: filter
