"""The embedded demo end to end, exactly as a newcomer runs it (slow: about 10 minutes on 2 cores)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_python_train_py_reaches_the_demo_accuracy(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", f"hydra.run.dir={tmp_path}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["modalities"]["image"]["exact_match"] >= 0.8, result
    assert result["modalities"]["audio"]["exact_match"] >= 0.8, result
