"""Faults a long run meets: SIGKILL (twice, and in the middle of a checkpoint save) and resume, a full disk while
saving, SIGTERM / SIGUSR1, non-finite losses."""
from __future__ import annotations

import csv
import math
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gemma_fusion.core.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


# The image position table is widened so that its backward (2 images x 8 patches x 2 axes x 1024 = 32768 gradient
# elements, ATen's grain) runs on several threads: while that sum was order-dependent (issue 16), runs drifted apart.
WIDE_TABLE = "model.vision.embed_dim=1024"


def _args(tiny_gemma4_dir, tiny_demo_dir, run_dir: Path, max_steps: int) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", f"backbone.path={tiny_gemma4_dir}",
            "~backbone.pretrain", f"data.train={tiny_demo_dir}/train", f"data.val={tiny_demo_dir}/val",
            "data.prepare_demo=false", "data.batch_size=2", "data.num_workers=2", "data.shuffle_buffer=4",
            "data.resampled=false", "data.image_tokens=8", "data.cache_gb=0", f"trainer.max_steps={max_steps}",
            "trainer.enable_progress_bar=false", "optim.warmup_steps=2", "checkpoint.every_n_steps=2",
            "eval_after_train=false", "resume=auto", WIDE_TABLE]


def _losses(run_dir: Path) -> dict[int, float]:
    with (run_dir / "metrics.csv").open(newline="") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120) -> None:
    """Until metrics.csv (flushed every step) holds a row for `step`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"the run ended before step {step}"
        try:
            if max(_losses(run_dir), default=-1) >= step:
                return
        except (OSError, ValueError, KeyError):
            pass  # the file is being written
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


STEPS = 16  # 18 samples / batch 2: the run crosses an epoch boundary


@pytest.fixture(scope="module")
def reference(tiny_gemma4_dir, tiny_demo_dir, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must reproduce."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    subprocess.run(_args(tiny_gemma4_dir, tiny_demo_dir, run_dir, STEPS), check=True, capture_output=True)
    return run_dir


def _assert_same_run(reference: Path, run_dir: Path, what: str) -> None:
    """The same logged loss at every step and the same final weights, bit for bit (a resumed run is the same
    computation; no tolerance to hide a resume error in); no partial checkpoint left."""
    expected, got = _losses(reference), _losses(run_dir)
    assert sorted(got) == sorted(expected), f"{what}: steps {sorted(got)}"
    different = {s: (expected[s], got[s]) for s in expected if got[s] != expected[s]}
    assert not different, f"{what}: (uninterrupted, resumed) loss at steps {different}"
    a = load_file(reference / "final" / "trainable.safetensors")
    b = load_file(run_dir / "final" / "trainable.safetensors")
    assert a.keys() == b.keys()
    differ = {k: (a[k] - b[k]).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not differ, f"{what}: final weights differ (max |a - b|): {differ}"
    assert not list((run_dir / "checkpoints").glob("*.tmp"))


@pytest.mark.slow  # subprocesses or many steps: `pytest -m slow`, its own step in .ci/run
@pytest.mark.parametrize("kills", [(9, 12), "random"])  # 9: just after the epoch boundary (9 batches/epoch)
def test_killed_twice_and_resumed_logs_the_losses_of_an_uninterrupted_run(kills, reference, tiny_gemma4_dir,
                                                                          tiny_demo_dir, tmp_path):
    killed = tmp_path / "killed"
    what = f"kills at {kills}"
    if kills == "random":  # a new pair each run; a failure names its seed: FAULT_KILL_SEED=<seed> replays it
        seed = int(os.environ.get("FAULT_KILL_SEED", random.randrange(2**32)))
        kills = sorted(random.Random(seed).sample(range(2, STEPS - 2), 2))
        what = f"kills at {kills} (FAULT_KILL_SEED={seed})"
        print(what)
    for kill_at in kills:
        proc = subprocess.Popen(_args(tiny_gemma4_dir, tiny_demo_dir, killed, STEPS), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        _wait_for_step(proc, killed, kill_at)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    subprocess.run(_args(tiny_gemma4_dir, tiny_demo_dir, killed, STEPS), check=True, capture_output=True)
    _assert_same_run(reference, killed, what)


@pytest.mark.slow  # subprocesses or many steps: `pytest -m slow`, its own step in .ci/run
@pytest.mark.parametrize("fault", ["kill_mid_save", "kill_before_rename"])
def test_a_kill_during_a_checkpoint_save_leaves_the_previous_checkpoints_and_resume_ignores_the_partial_one(
        fault, reference, tiny_gemma4_dir, tiny_demo_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = _args(tiny_gemma4_dir, tiny_demo_dir, run_dir, STEPS)
    died = subprocess.run([sys.executable, str(Path(__file__).with_name("fault_train.py")), fault, "3", *args[2:]],
                          capture_output=True, text=True)
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000002.ckpt", "step-0000004.ckpt",
                                                             "step-0000006.ckpt.tmp"]
    for path in checkpoints.glob("*.ckpt"):
        assert torch.load(path, weights_only=True)["global_step"] == int(path.stem.split("-")[1])
    if fault == "kill_mid_save":
        with pytest.raises(RuntimeError):  # the partial file really is unreadable
            torch.load(checkpoints / "step-0000006.ckpt.tmp", weights_only=True)

    resumed = subprocess.run(args, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "step-0000006.ckpt.tmp: a checkpoint save that did not finish" in resumed.stdout + resumed.stderr
    _assert_same_run(reference, run_dir, fault)


@pytest.mark.slow  # subprocesses or many steps: `pytest -m slow`, its own step in .ci/run
def test_a_full_disk_while_saving_is_one_sentence_and_the_previous_checkpoints_carry_the_run(
        reference, tiny_gemma4_dir, tiny_demo_dir, tmp_path):
    """A real write failure from the kernel: the resumed run gets a file-size limit (RLIMIT_FSIZE, EFBIG) below
    one checkpoint's size, so its first save fails part-way through the file, as on a full disk."""
    run_dir = tmp_path / "run"
    args = _args(tiny_gemma4_dir, tiny_demo_dir, run_dir, STEPS)
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_step(proc, run_dir, 5)  # checkpoints at steps 2 and 4 are written
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    checkpoints = run_dir / "checkpoints"
    before = {p.name: p.read_bytes() for p in checkpoints.glob("*.ckpt")}
    limit = min(len(b) for b in before.values()) // 2

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    full = subprocess.run(args, capture_output=True, text=True, preexec_fn=limit_file_size)
    out = full.stdout + full.stderr
    assert full.returncode == 1, out[-2000:]
    saved_at = max(int(name[5:12]) for name in before)
    assert (f"error: Could not write {checkpoints}/step-{saved_at + 2:07d}.ckpt (File too large); the previous "
            f"checkpoints in {checkpoints} are intact: free space and continue with resume=auto.") in out
    assert "Traceback" not in out
    assert {p.name: p.read_bytes() for p in checkpoints.iterdir()} == before  # untouched, nothing partial added

    subprocess.run(args, check=True, capture_output=True)
    _assert_same_run(reference, run_dir, "full disk")


def test_sigterm_checkpoints_at_the_next_step_and_exits_0(tiny_gemma4_dir, tiny_demo_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = _args(tiny_gemma4_dir, tiny_demo_dir, run_dir, 10_000)
    args[args.index("checkpoint.every_n_steps=2")] = "checkpoint.every_n_steps=0"
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_step(proc, run_dir, 3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-2000:]
    assert "continue with resume=auto" in out
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*.ckpt"))
    assert len(checkpoints) == 1 and int(checkpoints[0].stem.split("-")[1]) >= 3
    state = torch.load(checkpoints[0], weights_only=True)
    assert state["global_step"] >= 3 and "DataBookkeeping" in "".join(state["callbacks"])


def test_a_second_sigterm_stops_at_once_when_a_step_does_not_end():
    """The first SIGTERM waits for the step boundary (to checkpoint); a step that never ends (a stuck read) must
    not make the process unkillable by SIGTERM."""
    script = ("import os, signal\n"
              "from gemma_fusion.training.checkpointing import SignalCheckpoint\n"
              "callback = SignalCheckpoint('unused')\n"
              "callback.on_train_start(None, None)\n"
              "os.kill(os.getpid(), signal.SIGTERM)\n"
              "print('first: checkpoint requested', callback.requested, flush=True)\n"
              "os.kill(os.getpid(), signal.SIGTERM)\n"
              "print('second: still alive', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.stdout.splitlines() == ["first: checkpoint requested True"], proc.stdout + proc.stderr[-2000:]
    assert proc.returncode == -signal.SIGTERM


class _NanGradient(torch.autograd.Function):
    """The identity forward; backward sends NaN to every gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _poison(monkeypatch, at_steps: set[int], where: str = "loss"):
    """Make the loss (or, `where="gradient"`, only the gradients) NaN at the given steps of a real forward pass."""
    from gemma_fusion.training.module import FusionLitModule

    forward = FusionLitModule.forward

    def poisoned(self, batch):
        out = forward(self, batch)
        if self.global_step in at_steps:
            out.loss = out.loss * float("nan") if where == "loss" else _NanGradient.apply(out.loss)
        return out

    monkeypatch.setattr(FusionLitModule, "forward", poisoned)


def test_a_nan_loss_stops_the_run_with_one_sentence(make_cfg, tmp_path, monkeypatch):
    from gemma_fusion.training import recipe

    _poison(monkeypatch, {1})
    with pytest.raises(UserError, match="Non-finite loss at step 1"):
        recipe.train(make_cfg("trainer.max_steps=3"), tmp_path / "run")
    assert not (tmp_path / "run" / "final").exists()


def test_nan_losses_are_skipped_and_counted_when_allowed(make_cfg, tmp_path, monkeypatch):
    from gemma_fusion.training import recipe

    _poison(monkeypatch, {1, 2})
    model = recipe.train(make_cfg("trainer.max_steps=5", "optim.max_nonfinite_skips=2"), tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with (tmp_path / "run" / "metrics.csv").open(newline="") as f:
        skips = [float(r["train/nonfinite_skips"]) for r in csv.DictReader(f) if r.get("train/nonfinite_skips")]
    assert max(skips) == 2


def test_a_nan_gradient_stops_the_run_or_is_skipped_without_touching_the_weights(make_cfg, tmp_path, monkeypatch):
    from gemma_fusion.training import recipe

    _poison(monkeypatch, {1}, where="gradient")
    with pytest.raises(UserError, match="Non-finite gradient at step 1"):
        recipe.train(make_cfg("trainer.max_steps=3"), tmp_path / "stop")
    model = recipe.train(make_cfg("trainer.max_steps=3", "optim.max_nonfinite_skips=1"), tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in model.parameters())  # NaN gradients never reached AdamW
    with (tmp_path / "run" / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["train/nonfinite_skips"]) for r in rows if r.get("train/nonfinite_skips")] == [1.0]
    assert all(math.isfinite(float(r["train/loss"])) for r in rows if r.get("train/loss"))


@pytest.mark.slow  # subprocesses or many steps: `pytest -m slow`, its own step in .ci/run
def test_sigusr1_under_slurm_checkpoints_requeues_and_the_requeued_job_resumes(tiny_gemma4_dir, tiny_demo_dir,
                                                                               tmp_path):
    """SLURM's warning before the time limit (`--signal=USR1@120`): checkpoint at the step boundary, exit 0,
    `scontrol requeue` the job; the requeued job (same run directory, resume=auto) continues from there."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol.calls"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_NTASKS": "1",
           "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
           "SLURM_NODEID": "0"}
    run_dir = tmp_path / "run"
    args = _args(tiny_gemma4_dir, tiny_demo_dir, run_dir, 12)
    args[args.index("checkpoint.every_n_steps=2")] = "checkpoint.every_n_steps=0"
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    _wait_for_step(proc, run_dir, 3)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-2000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    (checkpoint,) = (run_dir / "checkpoints").glob("step-*.ckpt")
    stopped_at = int(checkpoint.stem.split("-")[1])
    assert 3 <= stopped_at < 12

    done = subprocess.run(args, capture_output=True, text=True, env=env)  # the requeued job
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert sorted(_losses(run_dir)) == list(range(12))  # stitched: every step once, none repeated
    assert (run_dir / "final" / "trainable.safetensors").is_file()
    assert calls.read_text().split() == ["requeue", "4242"]  # a finished job does not requeue
