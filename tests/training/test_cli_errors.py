"""Mistakes on the command line of train.py: each stops with one sentence that says what, where and what to do, and
no traceback unless HYDRA_FULL_ERROR=1 asks for one."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _train(*args: str, full_error: bool = False) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=env)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture
def tiny_args(tiny_gemma4_dir, tiny_demo_dir, tmp_path):
    return [f"hydra.run.dir={tmp_path / 'run'}", f"backbone.path={tiny_gemma4_dir}", "~backbone.pretrain",
            f"data.train={tiny_demo_dir}/train", f"data.val={tiny_demo_dir}/val", "data.prepare_demo=false",
            "trainer.max_steps=1"]


@pytest.mark.parametrize("override, sentence", [
    ("+model.vision.out_dim=32", "error: The vision projector outputs width 32 but the backbone's hidden size is 64"),
    ("model.audio._target_=os.system", "error: model.audio._target_=os.system is not allowed"),
    ("data.train=MISSING/shard-*.tar", "error: data.train: The shard pattern 'MISSING/shard-*.tar' matches no .tar "
                                       "files (in MISSING: ['notes.txt'])"),
    ("trainer.max_steps=abc", "error: trainer.max_steps=abc is not an integer (its default is"),
    ("optim.lr=fast", "error: optim.lr holds several keys (vision, audio, lora, backbone)"),
])
def test_a_mistake_is_one_sentence_without_a_traceback(override, sentence, tiny_args, tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "notes.txt").write_text("not a shard")
    override, sentence = (text.replace("MISSING", str(tmp_path / "shards")) for text in (override, sentence))
    code, out = _train(*tiny_args, override)
    assert code == 1, out[-2000:]
    assert sentence in out, out[-2000:]
    assert "Traceback" not in out
    assert not (tmp_path / "run" / "final").exists()


def test_hydra_full_error_shows_the_traceback(tiny_args):
    code, out = _train(*tiny_args, "+model.vision.out_dim=32", full_error=True)
    assert code == 1
    assert "Traceback" in out and "vision projector outputs width 32 but the backbone's hidden size is 64" in out
