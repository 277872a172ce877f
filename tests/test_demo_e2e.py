"""The embedded demo end to end, exactly as a newcomer runs it, scored on the test split that nothing in training
reads (slow: about 10 minutes on 2 cores; `pytest -m demo`), and the fast check that training never reads it.

`DEMO_E2E_MAX_STEPS=20 pytest -m demo tests/test_demo_e2e.py` checks the wiring in a few minutes: the same two
commands with `trainer.max_steps=20`, every assertion but the accuracy targets (which need the demo's own steps).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gemma_fusion.core.config import CONFIG_DIR
from gemma_fusion.core.errors import UserError
from gemma_fusion.data import sources
from gemma_fusion.eval import recipe as eval_recipe
from gemma_fusion.eval.evaluate import eval_shards
from gemma_fusion.training import recipe

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("dtmf", "ocr_digits", "ocr_words")
STEPS = os.environ.get("DEMO_E2E_MAX_STEPS")  # set: a wiring check, without the accuracy targets


def _compose(config: str, *overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config, overrides=list(overrides))


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """Every shard URL the data pipeline opens in this process (data.num_workers=0), in order."""
    urls, read = [], sources.read_shards
    monkeypatch.setattr(sources, "read_shards",
                        lambda shards, handler: read((urls.append(s["url"]) or s for s in shards), handler))
    return urls


def test_training_never_reads_the_test_split_and_eval_py_reports_it(tiny_gemma4_dir, tmp_path, opened):
    demo, run_dir = tmp_path / "demo", tmp_path / "run"
    cfg = _compose("train", f"backbone.path={tiny_gemma4_dir}", "backbone.pretrain=null",
                   *(f"data.{split}={demo}/{split}" for split in ("train", "val", "test")),
                   "data.demo_train_per_task=4", "data.demo_val_per_task=1", "data.demo_test_per_task=1",
                   "data.batch_size=4", "data.num_workers=0", "data.shuffle_buffer=0", "data.cache_gb=0",
                   "data.image_tokens=8", "trainer.max_steps=1", "trainer.enable_progress_bar=false",
                   "optim.warmup_steps=1", "checkpoint.every_n_steps=0")
    trained = recipe.run(cfg, run_dir)  # generates the demo data, trains, evaluates on data.val
    assert json.loads((demo / "manifest.json").read_text())["counts"]["test"] == {task: 1 for task in TASKS}
    assert {Path(url).parent.name for url in opened} == {"train", "val"}, opened
    assert trained["data"] == {"split": "val", "shards": f"{demo}/val"} and trained["overall"]["n"] == 3

    opened.clear()
    result = eval_recipe.run(_compose("eval", f"run={run_dir}", "data.eval=test", "max_new_tokens=2"))
    assert {Path(url).parent for url in opened} == {demo / "test"}
    assert result["data"] == {"split": "test", "shards": f"{demo}/test"}
    assert {task: m["n"] for task, m in result["tasks"].items()} == {task: 1 for task in TASKS}
    assert json.loads((run_dir / "eval.json").read_text()) == result

    data = OmegaConf.load(run_dir / "config.yaml").data
    spelt = os.path.relpath(demo / "test") + "/"  # the same shards spelt another way are still the test split
    assert eval_shards(data, spelt) == {"split": "test", "shards": spelt}
    assert eval_shards(data, f"{demo}/train") == {"split": None, "shards": f"{demo}/train"}
    data.test = None  # a run trained before data.test existed
    with pytest.raises(UserError, match=r"^data\.eval=test: the run has no data\.test .*; pass data\.eval=SHARDS\.$"):
        eval_shards(data, "test")


@pytest.mark.demo
@pytest.mark.slow
def test_python_train_py_reaches_the_demo_accuracy_on_the_test_split(tmp_path):
    steps = [f"trainer.max_steps={STEPS}"] if STEPS else []
    train = subprocess.run([sys.executable, "train.py", f"hydra.run.dir={tmp_path}", *steps], cwd=ROOT,
                           capture_output=True, text=True, timeout=1800)
    assert train.returncode == 0, train.stderr[-3000:]
    assert json.loads((tmp_path / "eval.json").read_text())["data"]["split"] == "val"  # training's own evaluation

    evaluation = subprocess.run([sys.executable, "eval.py", f"run={tmp_path}", "data.eval=test"], cwd=ROOT,
                                capture_output=True, text=True, timeout=600)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    result = json.loads((tmp_path / "eval.json").read_text())
    print(evaluation.stdout)
    assert result["data"]["split"] == "test"
    assert Path(result["data"]["shards"]).resolve() == (ROOT / "data" / "demo" / "test").resolve()
    assert {task: m["n"] for task, m in result["tasks"].items()} == {task: 200 for task in TASKS}
    if STEPS:
        return  # a wiring check: the targets below need the demo's own step count
    assert result["modalities"]["image"]["exact_match"] >= 0.8, result
    assert result["modalities"]["audio"]["exact_match"] >= 0.8, result
    for task, metrics in result["tasks"].items():
        assert metrics["exact_match"] >= 0.8, (task, result)
