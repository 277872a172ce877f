"""bench/loop_overhead.py measures what it says: its bare loop computes the recipe's own steps (the same losses as
Lightning's, step by step, from the same weights on the same batches), and it reports the ratio of the two."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_bare_loop_computes_the_recipes_steps(tiny_gemma4_dir, tiny_demo_dir):
    overrides = [f"backbone.path={tiny_gemma4_dir}", "backbone.pretrain=null", f"data.train={tiny_demo_dir}/train",
                 f"data.val={tiny_demo_dir}/val", "data.test=null", "data.prepare_demo=false", "data.batch_size=4",
                 "data.num_workers=0", "data.shuffle_buffer=0", "data.image_tokens=8", "data.cache_gb=0",
                 "trainer.enable_progress_bar=false", "optim.warmup_steps=2", "checkpoint.every_n_steps=0"]
    proc = subprocess.run([sys.executable, "bench/loop_overhead.py", "--steps", "6", "--warmup", "1", "--passes", "2",
                           *overrides], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["max_loss_diff"] < 1e-5, result  # six optimiser steps: a different update would show by then
    assert result["bare_ms_per_step"] > 0 and result["lightning_ms_per_step"] > 0
    assert result["overhead_ratio"] == pytest.approx(result["lightning_ms_per_step"] / result["bare_ms_per_step"],
                                                     abs=1e-2)
    assert set(result["environment"]) >= {"torch", "transformers", "peft", "lightning", "cpu"}
