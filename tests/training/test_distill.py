"""Distillation: KL on the response tokens from a finished run, online or from a cached top-k."""
from __future__ import annotations

import csv
import json
import math
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gemma_fusion.core.batch import model_inputs
from gemma_fusion.core.errors import UserError
from gemma_fusion.data.collate import collate
from gemma_fusion.data.pipeline import run_preprocessor
from gemma_fusion.training import recipe
from gemma_fusion.training.distill import kd_loss, load_teacher, read_cache
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


def test_kd_loss_is_the_kl_formula_on_known_distributions():
    """KL(p || q) = sum p log(p / q), written out with numbers: p = (0.5, 0.5), q = (0.9, 0.1) at T = 1, and at
    T = 2 on logits log p, log q (softened to p^(1/2), q^(1/2) renormalised) times T^2; the top-k form takes the
    teacher's log-probabilities at given indices and the student's full log-probabilities there."""
    p, q = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.9, 0.1]])
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert kd_loss(q.log(), p.log(), 1.0).item() == pytest.approx(expected, rel=1e-6)
    soft_p, soft_q = p.sqrt() / p.sqrt().sum(), q.sqrt() / q.sqrt().sum()
    expected_t2 = 4 * float((soft_p * (soft_p / soft_q).log()).sum())
    assert kd_loss(q.log(), p.log(), 2.0).item() == pytest.approx(expected_t2, rel=1e-6)
    student = torch.tensor([[0.6, 0.3, 0.1]]).log()  # teacher's top 2: tokens 2 and 0 with p = 0.75, 0.25
    teacher = torch.tensor([[0.75, 0.25]]).log()
    expected_top = 0.75 * math.log(0.75 / 0.1) + 0.25 * math.log(0.25 / 0.6)
    assert kd_loss(student, teacher, 1.0, torch.tensor([[2, 0]])).item() == pytest.approx(expected_top, rel=1e-6)


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

    # what the cache holds is the teacher's own answer: each training sample alone, under the teacher's
    # preprocessing (8 image tokens), its top 8 at every target, renormalised over the 8
    teacher, tcfg = load_teacher(teacher_run)
    preprocess = run_preprocessor(teacher, tcfg.data)
    cached = read_cache(cache, str(teacher_run), 8)
    fresh = {}
    for shard in sorted((tiny_demo_dir / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            raw: dict[str, dict] = {}
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                raw.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
        for key, sample in raw.items():
            batch = collate([preprocess(sample)], teacher.tokens.pad)
            with torch.no_grad():
                logits = teacher(**model_inputs(batch)).logits
            values, indices = logits.topk(8, dim=-1)
            fresh[key] = (indices, values.log_softmax(-1))
    assert cached.keys() == fresh.keys() and len(fresh) == 18
    for key, (indices, logprobs) in fresh.items():
        assert torch.equal(cached[key][0].long(), indices), key
        torch.testing.assert_close(cached[key][1].float(), logprobs, atol=2e-3, rtol=1e-3)  # stored as float16

    recipe.train(compose_train(tiny_gemma4_dir, tiny_demo_dir, *overrides), tmp_path / "b")
    assert [(f, f.stat().st_mtime_ns) for f in sorted(cache.iterdir())] == written  # read, not rewritten
    assert all(float(r["train/kl"]) > 0 for r in _rows(tmp_path / "b"))

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
