"""The command line as a user meets it: unknown options name the valid ones, user errors are one sentence."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _train(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


def test_unknown_option_lists_the_valid_choices():
    proc = _train("model/vision=vit_huge")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "vit_huge" in out and "patch_ef" in out and "none" in out
    assert "Traceback" not in out


def test_missing_backbone_path_is_one_sentence_without_traceback(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "shard-000000.tar").write_bytes(b"")  # data paths are checked first: they must exist
    proc = _train("backbone=path", f"backbone.path={tmp_path / 'missing'}", f"hydra.run.dir={tmp_path / 'run'}",
                  "data.prepare_demo=false", f"data.train={tmp_path / 'shards'}", f"data.val={tmp_path / 'shards'}")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "does not exist or is not a directory" in out and "Traceback" not in out


def test_unknown_key_names_the_valid_keys():
    proc = _train("trainer.max_stepz=5")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "unknown config option 'trainer.max_stepz'" in out and "max_steps" in out and "Traceback" not in out
