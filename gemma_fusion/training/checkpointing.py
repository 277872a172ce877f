"""Checkpoints that are never half-written, loaded safely, and taken on request (SIGTERM / SIGUSR1).

- `AtomicCheckpointIO` writes `step-N.ckpt.tmp`, fsyncs it and renames it into place: a kill or a full
  disk during a save leaves the previous checkpoints untouched and no file with the final name. It
  loads with `torch.load(weights_only=True)`: checkpoints hold tensors and plain Python types only.
- `SignalCheckpoint` turns SIGTERM (and SIGUSR1 outside SLURM, where Lightning requeues by itself)
  into "checkpoint at the next step boundary, then exit 0", so a preempted job resumes with
  `resume=auto` and loses nothing.
"""
from __future__ import annotations

import errno
import os
import random
import signal
from pathlib import Path

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback

from gemma_fusion.errors import UserError


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            if err.errno == errno.ENOSPC:
                raise UserError(f"No space left to write checkpoint {path}; the previous checkpoints in "
                                f"{path.parent} are intact. Free space and resume with resume=auto.") from err
            raise

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


def rng_state() -> dict:
    """Python, numpy and torch RNG states as tensors and plain types (weights_only-safe)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss], "torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


class SignalCheckpoint(Callback):
    """On SIGTERM / SIGUSR1: finish the current step, write a checkpoint, stop; the process exits 0."""

    def __init__(self, dirpath: Path):
        self.dirpath = Path(dirpath)
        self.requested = False

    def on_train_start(self, trainer, pl_module) -> None:
        """Registered after Lightning's own handlers (which act per rank and can stop the ranks at different
        steps): only this flag is used, and the stop is agreed across ranks at a step boundary."""
        from lightning.fabric.plugins.environments import SLURMEnvironment

        def request(signum, frame):
            self.requested = True

        signal.signal(signal.SIGTERM, request)
        if not SLURMEnvironment.detect() and hasattr(signal, "SIGUSR1"):
            signal.signal(signal.SIGUSR1, request)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        requested = self.requested or getattr(trainer, "received_sigterm", False)
        if trainer.world_size > 1:  # every rank must stop at the same step, or the collectives deadlock
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
            if requested:  # Lightning then raises SIGTERMException on every rank at this step boundary
                trainer._signal_connector.received_sigterm = True
        if requested:
            self._save(trainer)
            trainer.should_stop = True

    def on_exception(self, trainer, pl_module, exception) -> None:
        """Lightning's own SIGTERM handling raises at a step boundary (agreed across ranks); save before its
        teardown takes the process group down."""
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException) and not getattr(trainer, "stopped_by_signal", False):
            self._save(trainer)

    def _save(self, trainer) -> None:
        trainer.save_checkpoint(self.dirpath / f"step-{trainer.global_step:07d}.ckpt", weights_only=False)
        trainer.stopped_by_signal = True
