"""Exact resume: after kills and resumes, every sample of an epoch is trained on exactly once."""
from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset as wds
from lightning.pytorch.callbacks import Callback

from gemma_fusion.training import recipe
from gemma_fusion.training import callbacks as callbacks_module

BUILD_CALLBACKS = callbacks_module.build_callbacks


class Recorder(Callback):
    """Appends (epoch, step, sample keys) of every trained batch to a JSON-lines file."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with self.path.open("a") as f:
            f.write(json.dumps({"epoch": trainer.current_epoch, "step": trainer.global_step,
                                "keys": [m["key"] for m in batch["meta"]]}) + "\n")


def _run(make_cfg, run_dir: Path, log: Path, monkeypatch, *overrides: str) -> list[dict]:
    monkeypatch.setattr(callbacks_module, "build_callbacks", lambda cfg, rd: [Recorder(log), *BUILD_CALLBACKS(cfg, rd)])
    cfg = make_cfg("data.resampled=false", "data.batch_size=2", "data.num_workers=2", "data.shuffle_buffer=4",
                   "checkpoint.every_n_steps=2", "resume=auto", "eval_after_train=false", *overrides)
    before = log.read_text().count("\n") if log.exists() else 0
    recipe.train(cfg, run_dir)
    return [json.loads(line) for line in log.read_text().splitlines()[before:]]


def test_two_kills_and_resumes_see_every_sample_of_the_epoch_once(make_cfg, tiny_demo_dir, tmp_path, monkeypatch):
    shards = sorted(str(p) for p in (tiny_demo_dir / "train").glob("*.tar"))
    expected = [s["__key__"] for s in wds.WebDataset(shards, shardshuffle=False, empty_check=False)]
    assert len(shards) >= 2  # two loader workers each read shards
    run_dir, log = tmp_path / "run", tmp_path / "trained.jsonl"

    def kept(records: list[dict], resumed_from: int | None) -> list[dict]:
        """A kill after the run loses the steps after its last checkpoint (every 2 steps)."""
        return [r for r in records if resumed_from is None or r["step"] <= resumed_from]

    first = _run(make_cfg, run_dir, log, monkeypatch, "trainer.max_steps=3")  # checkpoint at 2, step 3 is lost
    second = _run(make_cfg, run_dir, log, monkeypatch, "trainer.max_steps=7")  # resumes at 2; checkpoints 4, 6
    third = _run(make_cfg, run_dir, log, monkeypatch, "trainer.max_steps=40")  # resumes at 6, runs past the epoch
    assert [r["step"] for r in first] == [1, 2, 3] and second[0]["step"] == 3 and third[0]["step"] == 7

    trained = kept(first, 2) + kept(second, 6) + third
    epoch0 = Counter(k for r in trained if r["epoch"] == 0 for k in r["keys"])
    assert sorted(epoch0) == sorted(expected)
    assert set(epoch0.values()) == {1}, f"samples trained more than once: {[k for k, n in epoch0.items() if n > 1]}"
    epoch1 = Counter(k for r in third if r["epoch"] == 1 for k in r["keys"])
    assert set(epoch1.values()) == {1}  # the next epoch starts over: fresh order, each sample once
    with (run_dir / "metrics.csv").open(newline="") as f:  # the three segments stitched, redone steps once
        logged = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert logged == list(range(logged[0], logged[0] + 40))
    checkpoint = sorted((run_dir / "checkpoints").glob("*.ckpt"))[-1]
    state = torch.load(checkpoint, weights_only=True)  # plain types only
    assert any("DataBookkeeping" in key for key in state["callbacks"])


def test_pipe_urls_need_opt_in(make_cfg, tmp_path):
    from gemma_fusion.data.sources import resolve_shards
    from gemma_fusion.core.errors import UserError

    with pytest.raises(UserError, match="allow_pipe"):
        resolve_shards("pipe:cat /etc/passwd")
    assert resolve_shards("pipe:cat a.tar", allow_pipe=True) == ["pipe:cat a.tar"]
