"""The GPU benchmark's code path, shrunk to run on a CPU (bench/gpu.sh runs the same code at full size)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_runs_every_measurement_on_a_cpu(tmp_path):
    out = subprocess.run([sys.executable, "bench/gpu_bench.py", "--cpu-smoke", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "gpu.json").read_text().splitlines()]
    assert not [r for r in rows if "error" in r]
    train = [r for r in rows if r["measure"] == "train"]
    assert len(train) == 1 and train[0]["tokens_per_s"] > 0 and train[0]["last_loss"] < train[0]["first_loss"] + 1
    decode = {(r["quant"], r["backend"]) for r in rows if r["measure"] == "decode"}
    assert {("bf16", "native"), ("int8", "native"), ("int4", "native")} <= decode
    assert all(r["decode_tokens_per_s"] > 0 for r in rows if r["measure"] == "decode")
