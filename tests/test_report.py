"""python -m gemma_fusion.report: a sweep directory -> report.md / report.json (intervals over seeds, paired bootstrap
differences, "no clear winner"), plots; the power-law fit's bootstrap interval; the distillation figure's interval."""
from __future__ import annotations

import itertools
import json
import math
import random

import numpy as np
import pytest
import yaml

from gemma_fusion.eval.compare import distillation_effect, paired_bootstrap_runs
from gemma_fusion.report import main, power_law_fit, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def _fake_run(job, overrides, seed, em, loss, flops=1e7, steps=40, batch=4, records=None, split="test"):
    """A finished sweep job; `records`: per-sample (exact_match, loss) pairs -> eval_predictions.jsonl."""
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
                                               "modalities": {"image": {"loss": loss, "exact_match": em, "n": 10}},
                                               "data": {"split": split, "shards": f"/data/{split}"}}))
    if records is not None:
        (job / "eval_predictions.jsonl").write_text("".join(
            json.dumps({"key": f"s{i:04d}", "modality": "image", "exact_match": e, "loss": v}) + "\n"
            for i, (e, v) in enumerate(records)))


def _sweep(tmp_path, designs: dict[str, list[list[tuple[float, float]]]]) -> None:
    """One job per (design, seed) with those per-sample records; eval.json holds their means."""
    job = 0
    for design, seeds in designs.items():
        for seed, records in enumerate(seeds):
            em, loss = float(np.mean([r[0] for r in records])), float(np.mean([r[1] for r in records]))
            _fake_run(tmp_path / str(job), ["experiment=ablation_vision", f"model/vision={design}"], seed, em, loss,
                      records=records)
            job += 1


def _records(rng, p_correct: float, n: int = 200) -> list[tuple[float, float]]:
    """n samples: exact match ~ Bernoulli(p_correct), per-sample loss lower where correct."""
    em = (rng.random(n) < p_correct).astype(float)
    return list(zip(em.tolist(), (1.5 - em + 0.3 * rng.random(n)).tolist()))


def reference_difference_interval(a: np.ndarray, b: np.ndarray, resamples: int = 2000) -> tuple[float, float]:
    """A plain two-level bootstrap written out in loops: each design's seeds with replacement, then the samples with
    replacement (the same for both designs); 2.5 % and 97.5 % of mean(a) - mean(b)."""
    rng, n, diffs = random.Random(1), a.shape[1], []
    for _ in range(resamples):
        seeds_a = [rng.randrange(len(a)) for _ in a]
        seeds_b = [rng.randrange(len(b)) for _ in b]
        cols = [rng.randrange(n) for _ in range(n)]
        mean_a = sum(a[s, c] for s in seeds_a for c in cols) / (len(seeds_a) * n)
        mean_b = sum(b[s, c] for s in seeds_b for c in cols) / (len(seeds_b) * n)
        diffs.append(mean_a - mean_b)
    diffs.sort()
    return diffs[int(0.025 * resamples)], diffs[int(0.975 * resamples) - 1]


def test_overlapping_designs_get_no_clear_winner_with_the_interval(tmp_path):
    """Design b's runs score a's runs' samples in another order (and 2 more right in one seed): a mean difference of
    2 / 600, far inside the noise of 200 samples and 3 seeds."""
    rng = np.random.default_rng(0)
    a = [_records(rng, 0.5) for _ in range(3)]
    b = [[seed[i] for i in rng.permutation(len(seed))] for seed in a]
    b[0] = [(1.0, 0.6) if i in (0, 1) else r for i, r in enumerate(sorted(b[0]))]  # the first 2 were wrong
    _sweep(tmp_path, {"a": a, "b": b})
    (tmp_path / "6" / ".hydra").mkdir(parents=True)  # an unfinished job: skipped, not fatal

    report = write_report(tmp_path).read_text()
    data = json.loads((tmp_path / "report.json").read_text())

    em = data["comparisons"]["exact_match"]
    assert em["winner"] is None and em["n_samples"] == 200
    (other,) = em["against_best"]
    diff = other["diff"]
    assert em["best"] == "model/vision=b" and diff[0] == pytest.approx(-2 / 600)
    assert diff[1] < 0 < diff[2] and other["clear"] is False and other["seeds"] == 3
    scores = np.array([[json.loads(line)["exact_match"] for line in (tmp_path / str(j) / "eval_predictions.jsonl")
                   .read_text().splitlines()] for j in range(6)])
    low, high = reference_difference_interval(scores[:3], scores[3:])  # a minus the best, b
    width = high - low
    assert abs(diff[1] - low) < 0.15 * width and abs(diff[2] - high) < 0.15 * width
    assert f"**Held-out exact match: no clear winner.** {em['best']} has the best mean" in report
    assert f"[{diff[1]:+.3f}, {diff[2]:+.3f}]" in report
    assert "experiment=ablation_vision" in report.split("|")[0]  # shared overrides are named once, not per row
    for name in ("loss_curves.png", "metric_vs_compute.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    assert not (tmp_path / "scaling.png").exists() and data["fit"] is None


def test_a_clear_gap_names_the_winner_and_rows_carry_a_t_interval_over_seeds(tmp_path):
    rng = np.random.default_rng(1)
    _sweep(tmp_path, {"weak": [_records(rng, p) for p in (0.25, 0.3, 0.35)],
                      "strong": [_records(rng, p) for p in (0.75, 0.8, 0.85)]})

    report = write_report(tmp_path).read_text()
    data = json.loads((tmp_path / "report.json").read_text())

    for metric in ("exact_match", "loss"):
        comparison = data["comparisons"][metric]
        assert comparison["winner"] == comparison["best"] == "model/vision=strong"
        assert comparison["against_best"][0]["clear"] is True
    assert data["comparisons"]["exact_match"]["against_best"][0]["diff"][2] < 0
    assert data["comparisons"]["loss"]["against_best"][0]["diff"][1] > 0  # the weak design's loss is higher
    assert "**Held-out exact match: model/vision=strong wins**" in report
    assert "**Held-out loss (per-sample mean): model/vision=strong wins**" in report
    row = next(r for r in data["designs"] if r["design"] == "model/vision=strong")
    assert row["seeds"] == [0, 1, 2] and set(row) >= {"em", "eval_loss", "final_loss", "training_flops", "trainable"}
    ems = [json.loads((tmp_path / str(j) / "eval.json").read_text())["overall"]["exact_match"] for j in (3, 4, 5)]
    half = 4.302652729749464 * np.std(ems, ddof=1) / math.sqrt(3)  # Student's t, 2 degrees of freedom, 97.5 %
    assert row["em_ci"] == pytest.approx([np.mean(ems), np.mean(ems) - half, np.mean(ems) + half])
    assert row["em"] == pytest.approx([np.mean(ems), np.std(ems, ddof=1)])  # the former (mean, std) key, kept
    assert f"| {np.mean(ems):.3f} [{np.mean(ems) - half:.3f}, {np.mean(ems) + half:.3f}] |" in report


def test_without_per_sample_records_the_report_says_so_instead_of_a_winner(tmp_path):
    for job, (design, em) in enumerate([("a", 0.2), ("b", 0.9)]):
        _fake_run(tmp_path / str(job), [f"model/vision={design}"], 0, em, 1.0)
    report = write_report(tmp_path).read_text()
    assert "Held-out exact match: no paired comparison (no per-sample records (eval_predictions.jsonl)" in report
    assert "wins" not in report
    row = json.loads((tmp_path / "report.json").read_text())["designs"][0]
    assert row["em_ci"] == [0.2, None, None]  # one seed: no interval


def test_the_report_names_the_held_out_split_and_warns_when_runs_differ(tmp_path):
    for job, split in enumerate(["test", "test"]):
        _fake_run(tmp_path / "same" / str(job), [f"model/vision=d{job}"], 0, 0.5, 1.0, split=split)
    report = write_report(tmp_path / "same").read_text()
    assert "Held-out data: the runs' `test` split (`/data/test`), the same for every run." in report
    for job, split in enumerate(["test", "val"]):
        _fake_run(tmp_path / "mixed" / str(job), [f"model/vision=d{job}"], 0, 0.5, 1.0, split=split)
    report = write_report(tmp_path / "mixed").read_text()
    assert "**Held-out data differ between runs** (test, val)" in report
    heldout = json.loads((tmp_path / "mixed" / "report.json").read_text())["heldout"]
    assert heldout["same"] is False and heldout["splits"] == ["test", "val"]


def test_the_seed_level_is_resampled_exactly_as_the_bootstrap_says():
    """Every sample of a run scores the run's value, so resampling samples changes nothing and the interval is that
    of mean(3 seeds of A drawn with replacement) - mean(3 of B): 27 x 27 equally likely outcomes, enumerated. A
    bootstrap that skipped the seeds would give a zero-width interval."""
    a_values, b_values = [0.1, 0.5, 0.6], [0.3, 0.35, 0.45]
    a = np.repeat(np.array(a_values)[:, None], 50, axis=1)
    b = np.repeat(np.array(b_values)[:, None], 50, axis=1)
    mean, low, high = paired_bootstrap_runs(a, b, samples=4000)
    outcomes = sorted(np.mean(x) - np.mean(y) for x in itertools.product(a_values, repeat=3)
                      for y in itertools.product(b_values, repeat=3))
    slack = 5 * math.sqrt(0.025 * 0.975 / 4000)

    def quantile(level):
        return outcomes[min(len(outcomes) - 1, int(level * len(outcomes)))]

    assert mean == pytest.approx(np.mean(a_values) - np.mean(b_values))
    assert quantile(0.025 - slack) - 1e-12 <= low <= quantile(0.025 + slack) + 1e-12
    assert quantile(0.975 - slack) - 1e-12 <= high <= quantile(0.975 + slack) + 1e-12


def test_the_samples_are_paired_between_designs():
    """One seed each; b is a with 10 of 400 wrong samples made right: the per-sample differences are 10 ones and 390
    zeros, so each resampled difference is Binomial(400, 1/40) / 400 (exact quantiles). Resampling the two
    designs' samples independently would add both designs' full Bernoulli noise and an interval ~8x wider."""
    rng = np.random.default_rng(0)
    a = (rng.random(400) < 0.5).astype(float)
    b = a.copy()
    b[np.flatnonzero(a == 0)[:10]] = 1.0
    mean, low, high = paired_bootstrap_runs([b], [a])
    cdf = np.cumsum([math.comb(400, k) * (1 / 40) ** k * (39 / 40) ** (400 - k) for k in range(401)])
    slack = 5 * math.sqrt(0.025 * 0.975 / 2000)
    quantile = lambda level: int(np.searchsorted(cdf, level)) / 400  # noqa: E731
    assert mean == pytest.approx(10 / 400)
    assert quantile(0.025 - slack) <= low <= quantile(0.025 + slack)
    assert quantile(0.975 - slack) <= high <= quantile(0.975 + slack)


def test_power_law_fit_r2_and_residuals_match_numpy():
    rng = random.Random(0)
    compute = [10 ** (9 + i / 3) for i in range(10)]
    loss = [5 * c ** -0.2 * math.exp(rng.gauss(0, 0.01)) for c in compute]
    fit = power_law_fit(compute, loss)
    x, y = np.log(compute), np.log(loss)
    slope, intercept = np.polyfit(x, y, 1)
    residuals = y - (slope * x + intercept)
    assert fit["b"] == pytest.approx(slope) and fit["a"] == pytest.approx(math.exp(intercept))
    assert fit["r2"] == pytest.approx(1 - np.sum(residuals ** 2) / np.sum((y - y.mean()) ** 2))
    assert fit["residuals"] == pytest.approx(residuals.tolist())
    assert fit["distinct_compute"] == 10 and fit["n"] == 10
    with pytest.raises(ValueError, match="different compute"):
        power_law_fit([1e9] * 3, [1.0, 2.0, 3.0])


def test_power_law_exponent_interval_is_a_bootstrap_over_runs_that_covers_the_truth():
    """16 runs at 4 distinct compute values, log-normal noise: the interval contains the true exponent in most of
    100 synthetic sweeps (a 95 % interval; the pairs bootstrap under-covers a little at n = 16) and has about the
    width of the least-squares normal-theory interval (a 50 % interval, or none, would not)."""
    rng = np.random.default_rng(0)
    compute = np.repeat([1e10, 4e10, 1.6e11, 6.4e11], 4)
    covered, ratios = 0, []
    for _ in range(100):
        loss = 5 * compute ** -0.15 * np.exp(rng.normal(0, 0.03, compute.size))
        fit = power_law_fit(compute.tolist(), loss.tolist(), samples=1000)
        covered += fit["b_low"] < -0.15 < fit["b_high"]
        x, y = np.log(compute), np.log(loss)
        _, cov = np.polyfit(x, y, 1, cov="unscaled")
        sigma = math.sqrt(np.sum((y - np.polyval(np.polyfit(x, y, 1), x)) ** 2) / (x.size - 2))
        ratios.append((fit["b_high"] - fit["b_low"]) / (2 * 2.145 * sigma * math.sqrt(cov[0, 0])))  # t(14) 97.5 %
    assert covered >= 85
    assert 0.75 < float(np.median(ratios)) < 1.15


def test_a_scaling_sweep_gets_a_fit_its_residuals_plot_and_a_warning_with_few_compute_values(tmp_path, capsys):
    for job, (hidden, flops) in enumerate([(64, 1e6), (96, 2e6), (128, 4e6), (160, 8e6)]):
        for seed in (0, 1):
            loss = 3 * (flops * 40 * 4 * 3.3) ** -0.1 * (1 + 0.01 * seed)
            _fake_run(tmp_path / f"{2 * job + seed}", ["experiment=scaling", f"backbone.pretrain.hidden_size={hidden}"],
                      seed, 0.5, loss, flops=flops)
    main([str(tmp_path)])
    assert capsys.readouterr().out.strip() == str(tmp_path / "report.md")
    report = (tmp_path / "report.md").read_text()
    assert "Power law over 8 runs (4 distinct compute values): held-out loss = " in report and "C^-0.1" in report
    assert "bootstrap over runs" in report and "Only" not in report
    for name in ("scaling.png", "scaling_residuals.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    fit = json.loads((tmp_path / "report.json").read_text())["fit"]
    assert fit["b_low"] <= fit["b"] <= fit["b_high"] and fit["distinct_compute"] == 4

    for job in (6, 7):
        for path in (tmp_path / str(job)).rglob("*"):
            if path.is_file():
                path.unlink()
    write_report(tmp_path)
    assert "Only 3 distinct compute values" in (tmp_path / "report.md").read_text()


def test_distillation_effect_interval_and_plain_sentence():
    """Teacher right everywhere: the student's kept fraction is its own exact match, whose resampled means are
    Binomial(n, p) / n, with known quantiles. A student that differs from the plain export on a handful of samples
    either way gains nothing measurable; one right on 60 more samples does."""
    n = 200
    teacher = {f"k{i}": {"exact_match": 1.0} for i in range(n)}
    plain = {f"k{i}": {"exact_match": float(i < 120)} for i in range(n)}
    student = {f"k{i}": {"exact_match": float(i < 118 or 120 <= i < 123)} for i in range(n)}  # -2 +3
    effect = distillation_effect(teacher, plain, student)
    cdf = np.cumsum([math.comb(n, k) * 0.605 ** k * 0.395 ** (n - k) for k in range(n + 1)])
    slack = 5 * math.sqrt(0.025 * 0.975 / 2000)
    quantile = lambda level: int(np.searchsorted(cdf, level)) / n  # noqa: E731
    mean, low, high = effect["student_keeps"]
    assert mean == pytest.approx(0.605)
    assert quantile(0.025 - slack) <= low <= quantile(0.025 + slack)
    assert quantile(0.975 - slack) <= high <= quantile(0.975 + slack)
    gain = effect["student_minus_plain"]
    assert gain[0] == pytest.approx(0.005) and gain[1] < 0 < gain[2] and effect["n"] == n
    assert effect["verdict"].endswith("distillation adds nothing measurable.")
    assert "keeps 60.5% [" in effect["verdict"] and "plain quantised export 60.0% [" in effect["verdict"]

    better = {f"k{i}": {"exact_match": float(i < 180)} for i in range(n)}
    effect = distillation_effect(teacher, plain, better)
    assert effect["student_minus_plain"][1] > 0 and "distillation adds a measurable gain" in effect["verdict"]


def test_distillation_control_separates_the_kl_term_from_the_extra_steps():
    """Students and controls (the same steps without the KL term) of several seeds: student minus control is the
    difference of their mean exact matches (a plain formula), its interval excludes zero only when the students
    really are better, and student minus plain averages over the student runs."""
    n = 300
    teacher = {f"k{i}": {"exact_match": 1.0} for i in range(n)}
    plain = {f"k{i}": {"exact_match": float(i < 150)} for i in range(n)}
    runs = lambda ends: [{f"k{i}": {"exact_match": float(i < end)} for i in range(n)} for end in ends]  # noqa: E731
    students, controls = runs([200, 205, 195]), runs([199, 204, 196])
    effect = distillation_effect(teacher, plain, students, controls)
    assert effect["student_minus_control"][0] == pytest.approx((600 - 599) / (3 * n))
    assert effect["student_minus_plain"][0] == pytest.approx(600 / (3 * n) - 150 / n)
    assert effect["student_minus_control"][1] < 0 < effect["student_minus_control"][2]
    assert effect["kl_verdict"].endswith("the KL term adds nothing measurable over the same steps without it.")
    assert effect["students"] == 3 and effect["controls"] == 3 and "(3 student runs)" in effect["verdict"]

    effect = distillation_effect(teacher, plain, students, runs([150, 155, 160]))
    assert effect["student_minus_control"][1] > 0 and "the KL term adds a measurable gain" in effect["kl_verdict"]
    assert "kl_verdict" not in distillation_effect(teacher, plain, students)


def test_not_a_sweep_directory_is_one_sentence(tmp_path):
    with pytest.raises(SystemExit, match="no finished runs"):
        write_report(tmp_path)
