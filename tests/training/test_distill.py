"""Distillation: KL on the response tokens from a finished run, online or from a cached top-k."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gemma_fusion.training import recipe
from gemma_fusion.core.errors import UserError
from gemma_fusion.training.distill import kd_loss
from tests.training.conftest import compose_train


@pytest.fixture(scope="module")
def teacher_run(tiny_gemma4_dir, tiny_demo_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("teacher")
    recipe.train(compose_train(tiny_gemma4_dir, tiny_demo_dir, "eval_after_train=false", "trainer.max_steps=3"),
                      run_dir)
    return run_dir


def _rows(run_dir: Path) -> list[dict]:
    return [r for r in csv.DictReader(open(run_dir / "metrics.csv")) if r.get("train/loss")]


def test_kd_loss_is_zero_for_the_teacher_itself_and_top_k_of_everything_is_the_full_kl():
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(5, 50, generator=g), torch.randn(5, 50, generator=g)
    assert kd_loss(teacher, teacher, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    full = kd_loss(student, teacher, 2.0)
    assert full.item() > 0.01
    values, indices = teacher.topk(50, dim=-1)
    assert kd_loss(student, F.log_softmax(values, -1), 2.0, indices).item() == pytest.approx(full.item(), rel=1e-5)
    values, indices = teacher.topk(5, dim=-1)  # the teacher's head only: still >= 0, and 0 only for a perfect match
    assert kd_loss(student, F.log_softmax(values, -1), 2.0, indices).item() > 0


def test_the_distill_preset_starts_an_int8_student_from_the_teacher(tiny_gemma4_dir, tiny_demo_dir, teacher_run):
    cfg = compose_train(tiny_gemma4_dir, tiny_demo_dir, "experiment=distill", f"distill.teacher={teacher_run}")
    assert cfg.backbone.quant == "int8" and cfg.model.init_from == str(teacher_run) and cfg.optim.lr.lora == 2e-4


def test_an_int8_student_learns_from_the_teacher_online(tiny_gemma4_dir, tiny_demo_dir, teacher_run, tmp_path):
    cfg = compose_train(tiny_gemma4_dir, tiny_demo_dir, "experiment=distill", f"distill.teacher={teacher_run}",
                        "model.init_from=null", "eval_after_train=false", "trainer.max_steps=12",
                        "distill.alpha=0.75", "optim.warmup_steps=1")
    assert cfg.backbone.quant == "int8"
    recipe.train(cfg, tmp_path)
    rows = _rows(tmp_path)
    for r in rows:  # the logged loss is the mix of the two logged terms
        mix = 0.75 * float(r["train/kl"]) + 0.25 * float(r["train/ce"])
        assert float(r["train/loss"]) == pytest.approx(mix, rel=1e-4)
    kl = [float(r["train/kl"]) for r in rows]
    assert sum(kl[-3:]) / 3 < sum(kl[:3]) / 3  # the student moves towards the teacher


def test_a_cached_teacher_runs_once_and_serves_a_student_with_another_image_budget(
        tiny_gemma4_dir, tiny_demo_dir, teacher_run, tmp_path):
    cache = tmp_path / "cache"
    overrides = ["distill=teacher", f"distill.teacher={teacher_run}", "distill.top_k=8", f"distill.cache={cache}",
                 "eval_after_train=false", "data.image_tokens=4"]  # the teacher saw 8 image tokens
    recipe.train(compose_train(tiny_gemma4_dir, tiny_demo_dir, *overrides), tmp_path / "a")
    index = json.loads((cache / "index.json").read_text())
    assert index["top_k"] == 8 and index["samples"] == 18  # 3 tasks x 6 training samples: every sample once
    written = [(f, f.stat().st_mtime_ns) for f in sorted(cache.iterdir())]
    recipe.train(compose_train(tiny_gemma4_dir, tiny_demo_dir, *overrides), tmp_path / "b")
    assert [(f, f.stat().st_mtime_ns) for f in sorted(cache.iterdir())] == written  # read, not rewritten
    assert all(float(r["train/kl"]) >= 0 for r in _rows(tmp_path / "b"))

    other = [o.replace("distill.top_k=8", "distill.top_k=4") for o in overrides]
    with pytest.raises(UserError, match="top-8 of teacher"):
        recipe.train(compose_train(tiny_gemma4_dir, tiny_demo_dir, *other), tmp_path / "c")


def test_bad_distill_settings_stop_at_start(tiny_gemma4_dir, tiny_demo_dir, teacher_run, tmp_path):
    for override, message in (("distill.alpha=1.5", "between 0"), ("distill.cache=/tmp/x", "set distill.top_k")):
        cfg = compose_train(tiny_gemma4_dir, tiny_demo_dir, "distill=teacher", f"distill.teacher={teacher_run}",
                            override, "eval_after_train=false")
        with pytest.raises(UserError, match=message):
            recipe.train(cfg, tmp_path / override.split("=")[0])
    cfg = compose_train(tiny_gemma4_dir, tiny_demo_dir, "distill=teacher", f"distill.teacher={tmp_path}",
                        "eval_after_train=false")
    with pytest.raises(UserError, match="neither a train.py run"):
        recipe.train(cfg, tmp_path / "nothing")
