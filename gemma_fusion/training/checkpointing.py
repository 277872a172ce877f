"""Checkpoints that are never half-written, loaded safely, and taken on request (SIGTERM / SIGUSR1).

- `AtomicCheckpointIO` writes `step-N.ckpt.tmp`, fsyncs it and renames it into place: a kill or a full
  disk during a save leaves the previous checkpoints untouched and no file with the final name (`resume=auto`
  reads only `*.ckpt` and removes a kill's leftover `.tmp`). It loads with `torch.load(weights_only=True)`:
  checkpoints hold tensors and plain Python types only.
- `SignalCheckpoint` turns SIGTERM and SIGUSR1 into "checkpoint at the next step boundary, then exit 0",
  so a preempted job resumes with `resume=auto` and loses nothing; a second SIGTERM stops the process at once
  (for a step that does not end). Under SLURM, SIGUSR1 (`#SBATCH
  --signal=USR1@120`, sent before the time limit) also requeues the job (`scontrol requeue`); Lightning's
  own SLURM handler, which saves in the middle of a step, is switched off (`slurm_environment`).
"""
from __future__ import annotations

import logging
import os
import pickle
import random
import signal
import subprocess
from pathlib import Path

import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from gemma_fusion.core.errors import UserError
from gemma_fusion.core.files import replaced_atomically

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        with replaced_atomically(path, f"the previous checkpoints in {path.parent} are intact: free space and "
                                       "continue with resume=auto") as tmp, open(tmp, "wb") as f:
            save_reporting_os_errors(checkpoint, f)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        try:
            return torch.load(path, map_location=map_location or "cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise UserError(f"{path} holds Python objects other than tensors and plain values, which gemma_fusion "
                            "never writes and never loads (weights_only=True); it is not one of this project's "
                            "checkpoints, or it was altered.") from err


def save_reporting_os_errors(obj, f) -> None:
    """torch.save into the open file `f`; a failed write raises its OSError (torch reports it as a RuntimeError
    without the errno, so a full disk would look like a bug)."""
    class Recording:
        def __init__(self):
            self.error = None

        def write(self, data):
            try:
                return f.write(data)
            except OSError as err:
                self.error = err
                raise

        def flush(self):
            f.flush()

    recording = Recording()
    try:
        torch.save(obj, recording)
    except RuntimeError:
        if recording.error is not None:
            raise recording.error from None
        raise


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


def slurm_environment():
    """Under SLURM: Lightning's SLURM environment without its SIGUSR1 handler (SignalCheckpoint takes the
    signal and saves at a step boundary instead of mid-step); None elsewhere."""
    return SLURMEnvironment(auto_requeue=False) if SLURMEnvironment.detect() else None


def slurm_job_id() -> str | None:
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def requeue_slurm_job() -> None:
    """`scontrol requeue` this job: SLURM starts it again, and `resume=auto` continues from the checkpoint."""
    job = slurm_job_id()
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("could not requeue SLURM job %s (%s); resubmit it with resume=auto", job, err)
        return
    if result.returncode:
        log.warning("scontrol requeue %s failed (%s); resubmit it with resume=auto", job, result.stderr.strip())
    else:
        log.info("SLURM job %s requeued", job)


class SignalCheckpoint(Callback):
    """On SIGTERM / SIGUSR1: finish the current step, write a checkpoint, stop; the process exits 0.

    Under SLURM a SIGUSR1 (the time limit is near) also requeues the job from global rank 0; a SIGTERM
    (scancel, or preemption, which requeues by itself when the partition says so) does not.
    """

    def __init__(self, dirpath: Path):
        self.dirpath = Path(dirpath)
        self.requested = False
        self.requeue = False

    def on_train_start(self, trainer, pl_module) -> None:
        """Registered after Lightning's own handlers (which act per rank and can stop the ranks at different
        steps): only this flag is used, and the stop is agreed across ranks at a step boundary."""
        slurm = SLURMEnvironment.detect()

        def request(signum, frame):
            if self.requested and signum == signal.SIGTERM:  # a second SIGTERM: stop now, without a checkpoint
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            self.requested = True
            self.requeue = self.requeue or (slurm and signum == getattr(signal, "SIGUSR1", None))

        signal.signal(signal.SIGTERM, request)
        if hasattr(signal, "SIGUSR1"):
            signal.signal(signal.SIGUSR1, request)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        requested = self.requested or getattr(trainer, "received_sigterm", False)
        if trainer.world_size > 1:  # every rank must stop at the same step, or the collectives deadlock
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
            self.requeue = trainer.strategy.reduce_boolean_decision(self.requeue, all=False)
            if requested:  # Lightning then raises SIGTERMException on every rank at this step boundary
                trainer._signal_connector.received_sigterm = True
        if requested:
            self._save(trainer)
            trainer.should_stop = True

    def on_exception(self, trainer, pl_module, exception) -> None:
        """Lightning's own SIGTERM handling raises at a step boundary (agreed across ranks); save before its
        teardown takes the process group down."""
        if isinstance(exception, SIGTERMException) and not getattr(trainer, "stopped_by_signal", False):
            self._save(trainer)

    def _save(self, trainer) -> None:
        trainer.save_checkpoint(self.dirpath / f"step-{trainer.global_step:07d}.ckpt", weights_only=False)
        trainer.stopped_by_signal = True
        if self.requeue and trainer.is_global_zero:  # the signal reached rank 0 (SLURM signals every task)
            requeue_slurm_job()
