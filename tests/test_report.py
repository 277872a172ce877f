"""python -m gemma_fusion.report: a sweep directory -> report.md (mean ± std over seeds) and plots."""
from __future__ import annotations

import json
import math
import random

import pytest
import yaml

from gemma_fusion.report import main, power_law_fit, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def _fake_run(job, overrides, seed, em, loss, flops=1e7, steps=40, batch=4):
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides + [f"seed={seed}"]))
    (job / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "trainer": {"max_steps": steps},
                                                     "data": {"batch_size": batch}}))
    parts = {p: {"trainable": 10, "frozen": 100 if p == "backbone" else 0} for p in ("vision", "audio", "lora", "backbone")}
    (job / "compute.json").write_text(json.dumps({
        "parameters": parts, "tokens": {"per_image": 8.0, "per_audio_second": None},
        "forward_flops_per_sample": {"vision": flops / 10, "audio": 0.0, "backbone": flops, "total": 1.1 * flops}}))
    rows = ["step,train/loss"] + [f"{s},{loss + (steps - s) / steps}" for s in range(steps)]
    (job / "metrics.csv").write_text("\n".join(rows) + "\n")
    (job / "eval.json").write_text(json.dumps({"overall": {"loss": loss, "exact_match": em, "n": 10},
                                               "modalities": {"image": {"loss": loss, "exact_match": em, "n": 10}}}))


def test_one_row_per_design_with_mean_and_std_over_seeds(tmp_path):
    results = {"a": [(0.50, 1.0), (0.70, 0.8)], "b": [(0.90, 0.5), (0.80, 0.6)]}
    job = 0
    for design, seeds in results.items():
        for seed, (em, loss) in enumerate(seeds):
            _fake_run(tmp_path / str(job), ["experiment=ablation_vision", f"model/vision={design}"], seed, em, loss)
            job += 1
    (tmp_path / str(job) / ".hydra").mkdir(parents=True)  # an unfinished job: skipped, not fatal

    report = write_report(tmp_path).read_text()

    rows = [line for line in report.splitlines() if line.startswith("| model/vision=")]
    assert [r.split(" | ")[0] for r in rows] == ["| model/vision=a", "| model/vision=b"]
    assert "| 0.600 ± 0.141 |" in rows[0] and "| 0.850 ± 0.071 |" in rows[1]  # EM: mean ± sample std
    assert "| 0.900 ± 0.141 |" in rows[0]  # held-out loss
    assert "**Lowest held-out loss: model/vision=b** (0.550 ± 0.071, exact match 0.850 ± 0.071), 0.350 below the " \
        "runner-up model/vision=a (0.900 ± 0.141) — more than the seeds' spread (0.141)" in report
    assert "Best held-out exact match: model/vision=b (0.850 ± 0.071)." in report
    assert "experiment=ablation_vision" in report.split("|")[0]  # shared overrides are named once, not per row
    for name in ("loss_curves.png", "metric_vs_compute.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    assert not (tmp_path / "scaling.png").exists()


def test_power_law_fit_recovers_the_exponent():
    rng = random.Random(0)
    compute = [10 ** (9 + i / 3) for i in range(10)]
    loss = [5 * c ** -0.2 * math.exp(rng.gauss(0, 0.01)) for c in compute]
    fit = power_law_fit(compute, loss)
    assert fit["b_low"] < -0.2 < fit["b_high"] and abs(fit["b"] + 0.2) < 0.01 and fit["r2"] > 0.99
    with pytest.raises(ValueError, match="different compute"):
        power_law_fit([1e9] * 3, [1.0, 2.0, 3.0])


def test_a_scaling_sweep_gets_a_fit_and_its_plot(tmp_path, capsys):
    for job, (hidden, flops) in enumerate([(64, 1e6), (96, 4e6), (128, 1.6e7)]):
        for seed in (0, 1):
            loss = 3 * (flops * 40 * 4 * 3.3) ** -0.1 * (1 + 0.01 * seed)
            _fake_run(tmp_path / f"{2 * job + seed}", ["experiment=scaling", f"backbone.pretrain.hidden_size={hidden}"],
                      seed, 0.5, loss, flops=flops)
    main([str(tmp_path)])
    assert capsys.readouterr().out.strip() == str(tmp_path / "report.md")
    report = (tmp_path / "report.md").read_text()
    assert "Power law over 6 runs: held-out loss = " in report and "C^-0.1" in report
    assert (tmp_path / "scaling.png").read_bytes()[:8] == PNG


def test_not_a_sweep_directory_is_one_sentence(tmp_path):
    with pytest.raises(SystemExit, match="no finished runs"):
        write_report(tmp_path)
