"""Two-process CPU DDP through `python train.py trainer=ddp` (Lightning's launcher) and torchrun.

The run goes through `ddp_probe.py` (train.py's Hydra app + a recording callback), so each rank's
batches and weights are observed in the real run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.utilities import rank_zero_only
from safetensors.torch import load_file

from gemma_fusion.data.sources import ShardStream, resolve_shards
from gemma_fusion.training.callbacks import save_final

ROOT = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("ddp_probe.py")
STEPS = 3
TABLE_HEADER = "task             n"


def _launch(launcher: str, cwd: Path, backbone: Path, demo: Path, *extra: str) -> subprocess.CompletedProcess:
    overrides = [
        "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
        f"backbone.path={backbone}", "~backbone.pretrain", f"data.train={demo}/train", f"data.val={demo}/val",
        "data.prepare_demo=false", "data.resampled=false", "data.num_workers=0", "data.shuffle_buffer=0",
        "data.batch_size=2", "data.eval_batch_size=4", "data.image_tokens=8", "data.cache_gb=0",
        f"trainer.max_steps={STEPS}", "trainer.enable_progress_bar=false", "optim.warmup_steps=1",
        "checkpoint.every_n_steps=0", *extra,
    ]
    start = [sys.executable] if launcher == "lightning" else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "SLURM_NTASKS", "HYDRA_FULL_ERROR")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([*start, str(PROBE), *overrides], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def _rank_shares(demo: Path, monkeypatch) -> list[set[str]]:
    """The sample keys the loader's shard dealing gives each of 2 ranks (epoch 0, seed 0), read directly."""
    urls = resolve_shards(str(demo / "train"))
    shares = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        shares.append({s["__key__"] for s in ShardStream(urls, seed=0, resampled=False, handler=None)(0)})
    return shares


@pytest.mark.slow  # subprocesses or many steps: `pytest -m slow`, its own step in .ci/run
@pytest.mark.parametrize("launcher", ["lightning", "torchrun"])
def test_two_ranks_split_the_data_and_end_with_identical_weights(launcher, tiny_gemma4_dir, even_demo_dir,
                                                                 tmp_path, monkeypatch):
    pinned = () if launcher == "lightning" else (f"hydra.run.dir={tmp_path / 'runs' / 'pinned'}",)
    proc = _launch(launcher, tmp_path, tiny_gemma4_dir, even_demo_dir, *pinned)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Traceback" not in out and "Error executing job" not in out, out[-4000:]  # rank 1 too

    # One run directory (Lightning's launcher hands rank 0's to rank 1); rank 0 alone evaluates, on all of val.
    [run_dir] = (tmp_path / "runs").iterdir()
    assert out.count(TABLE_HEADER) == 1
    assert json.loads((run_dir / "eval.json").read_text())["overall"]["n"] == 12
    assert (run_dir / "config.yaml").is_file()

    # (a) Each rank trained on its own share of the shards, the same share the loader deals out directly.
    shares = _rank_shares(even_demo_dir, monkeypatch)
    assert not shares[0] & shares[1] and len(shares[0]) == len(shares[1]) == 12
    trained = []
    for rank in (0, 1):
        records = [json.loads(line) for line in (run_dir / f"rank{rank}.keys.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == list(range(1, STEPS + 1))
        trained.append({k for r in records for k in r["keys"]})
        assert trained[rank] <= shares[rank]
    assert not trained[0] & trained[1]

    # (b) Gradients were averaged: ranks that saw different batches end with the same weights, which moved,
    # and rank 0's export holds exactly them.
    start, end = ([load_file(run_dir / f"rank{r}.{which}.safetensors") for r in (0, 1)] for which in ("start", "end"))
    final = load_file(run_dir / "final" / "trainable.safetensors")
    assert end[0].keys() == end[1].keys() == final.keys() == start[0].keys()
    assert all(torch.equal(end[0][k], end[1][k]) and torch.equal(end[0][k], final[k]) for k in final)
    assert any(not torch.equal(start[0][k], end[0][k]) for k in final)


def test_only_rank_zero_writes_the_final_weights(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    path = save_final(model, tmp_path)
    assert path == tmp_path / "final" / "trainable.safetensors" and not path.exists()
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    assert set(load_file(save_final(model, tmp_path))) == {"weight", "bias"}


def test_external_launch_needs_a_pinned_run_dir(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "data.prepare_demo=false", "~backbone.pretrain"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "hydra.run.dir" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow  # subprocesses or many steps: `pytest -m slow`, its own step in .ci/run
def test_sigterm_to_every_rank_checkpoints_once_and_exits_0(tiny_gemma4_dir, even_demo_dir, tmp_path):
    """As SLURM does at preemption: SIGTERM to all ranks; they agree on a step, checkpoint, exit 0."""
    import signal
    import time

    run_dir = tmp_path / "run"
    overrides = [
        "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
        f"backbone.path={tiny_gemma4_dir}", "~backbone.pretrain", f"data.train={even_demo_dir}/train",
        f"data.val={even_demo_dir}/val", "data.prepare_demo=false", "data.resampled=true", "data.num_workers=0",
        "data.batch_size=2", "data.image_tokens=8", "data.cache_gb=0", "trainer.max_steps=100000",
        "trainer.enable_progress_bar=false", "optim.warmup_steps=1", "checkpoint.every_n_steps=0",
        "eval_after_train=false", f"hydra.run.dir={run_dir}",
    ]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "SLURM_NTASKS", "HYDRA_FULL_ERROR")}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *overrides], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not (run_dir / "metrics.csv").is_file() or (run_dir / "metrics.csv").read_text().count("\n") < 4:
        assert proc.poll() is None and time.time() < deadline, "the DDP run did not reach step 3"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the ranks did not stop within a minute of SIGTERM")
    assert proc.returncode == 0, out[-3000:]
    assert len(list((run_dir / "checkpoints").glob("step-*.ckpt"))) == 1, out[-3000:]
