"""Side-by-side comparison of runs evaluated on the same samples: `python eval.py run=A compare=[B,C]`.

Each run is evaluated with its own preprocessing on the same shards (`evaluate_into`); this module pairs
their per-sample records by sample key and reports, per run: what it costs (trainable parameters, soft
tokens per image / audio second, forward FLOPs per sample, from `RUN/compute.json`) and held-out loss,
exact match, CER and WER, overall and per modality; then, for every other run against the first, the
difference in exact match and in per-sample loss with a paired bootstrap 95 % interval, and its exact match
as a fraction of the first run's, so a user can tell a real difference from the noise of a few hundred samples.

Writes `A/eval_compare.json` = {"runs": [{"run", "label", "cost", "overall", "modalities"}, ...],
"paired": [{"run", "against", "n", "exact_match_diff": [mean, lo, hi], "loss_diff": [mean, lo, hi],
"exact_match_ratio": [ratio, lo, hi] (null when the first run's exact match is 0),
"modalities": {"image": {"n", "exact_match_diff"}, ...}}]}.

The one bootstrap of the package is here (`paired_bootstrap_runs`): the sweep report (eval/report.py) uses it
for differences between designs over evaluation samples and seeds, `distillation_effect` for what a distilled
student gains over the plain quantised export.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gemma_fusion.artifacts.rundir import RunDir
from gemma_fusion.core.errors import UserError

BOOTSTRAP_SAMPLES = 2000
IGNORED_OVERRIDES = ("hydra.", "data.train=", "data.val=", "data.eval=")


def read_records(run_dir: Path) -> dict[str, dict]:
    """The run's per-sample evaluation records (`RunDir.predictions`) keyed by sample key."""
    lines = RunDir(run_dir).predictions.read_text().splitlines()
    return {r["key"]: r for r in map(json.loads, filter(None, lines))}


def run_labels(run_dirs: list[Path]) -> list[str]:
    """What tells the runs apart: the command-line overrides they do not share (else the directory name)."""
    overrides = []
    for run_dir in run_dirs:
        found = RunDir(run_dir).read_overrides()
        overrides.append([o for o in found or [] if not o.startswith(IGNORED_OVERRIDES)])
    common = set.intersection(*map(set, overrides)) if overrides else set()
    labels = [" ".join(sorted(o for o in ov if o not in common)) for ov in overrides]
    return [label or run_dir.name for label, run_dir in zip(labels, run_dirs)]


def cost_of(run_dir: Path) -> dict:
    """Trainable parameters, soft tokens and forward FLOPs per sample from the run's compute report ({} if absent)."""
    compute = RunDir(run_dir).read_compute()
    if compute is None:
        return {}
    flops = compute["forward_flops_per_sample"]
    return {"trainable_params": sum(p["trainable"] for p in compute["parameters"].values()),
            "tokens_per_image": compute["tokens"]["per_image"],
            "tokens_per_audio_second": compute["tokens"]["per_audio_second"],
            "projector_flops_per_sample": flops["vision"] + flops["audio"],
            "backbone_flops_per_sample": flops["backbone"]}


def percentile_interval(estimate: float, replicates) -> list[float]:
    """[estimate, 2.5 %, 97.5 %]: the 95 % percentile interval of a statistic's bootstrap replicates."""
    ordered, k = np.sort(np.asarray(replicates, dtype=float)), len(replicates)
    return [float(estimate), float(ordered[int(0.025 * k)]), float(ordered[int(0.975 * k) - 1])]


def paired_bootstrap_runs(runs, base, statistic: Callable = np.subtract, seed: int = 0,
                          samples: int = BOOTSTRAP_SAMPLES) -> list[float]:
    """[estimate, 2.5 %, 97.5 %] of statistic(mean of `runs`, mean of `base`) over the same evaluated samples.

    runs: (seeds, n) per-sample values of one design, a row per training run; base: (seeds', n), the same n
    samples in the same column order. Each resample draws each side's rows with replacement (its own seeds:
    training luck) and then n columns with replacement, the same columns for both sides (the pairing:
    evaluation luck). statistic: np.subtract (a difference) or np.divide (a fraction of the base).
    """
    a, b = np.atleast_2d(np.asarray(runs, dtype=float)), np.atleast_2d(np.asarray(base, dtype=float))
    if a.shape[1] != b.shape[1] or a.shape[1] == 0:
        raise ValueError(f"paired bootstrap: {a.shape[1]} and {b.shape[1]} samples; pair the same, non-empty set.")
    rng, n, replicates = np.random.default_rng(seed), a.shape[1], []
    for start in range(0, samples, 250):  # 250 resamples at a time: memory (seeds x 250 x n) stays small
        count = min(250, samples - start)
        columns = rng.integers(0, n, (count, n))
        means = []
        for side in (a, b):
            per_seed = side[:, columns].mean(-1)  # seeds, count: each run's mean over the resampled samples
            rows = rng.integers(0, len(side), (count, len(side)))
            means.append(np.take_along_axis(per_seed.T, rows, 1).mean(1))  # count: over the resampled runs
        with np.errstate(divide="ignore", invalid="ignore"):
            replicates.append(statistic(*means))
    with np.errstate(divide="ignore", invalid="ignore"):
        estimate = statistic(a.mean(), b.mean())
    return percentile_interval(estimate, np.concatenate(replicates))


def paired_bootstrap(diffs: list[float], seed: int = 0, samples: int = BOOTSTRAP_SAMPLES) -> list[float]:
    """[mean, 2.5 %, 97.5 %] of the mean of per-sample differences, resampling samples with replacement."""
    return paired_bootstrap_runs([diffs], [[0.0] * len(diffs)], seed=seed, samples=samples)


def paired(records: dict[str, dict], base: dict[str, dict]) -> dict:
    """Per-sample differences (this run minus the base run) over the samples both evaluated."""
    keys = sorted(records.keys() & base.keys())
    if not keys:
        raise UserError("compare: the runs share no evaluated samples; evaluate them on the same shards "
                        "(data.eval=SHARDS).")
    em = [records[k]["exact_match"] - base[k]["exact_match"] for k in keys]
    loss = [records[k]["loss"] - base[k]["loss"] for k in keys]
    modalities = {}
    for modality in sorted({records[k].get("modality") for k in keys} - {None}):
        mine = [k for k in keys if records[k].get("modality") == modality]
        modalities[modality] = {"n": len(mine), "exact_match_diff": paired_bootstrap(
            [records[k]["exact_match"] - base[k]["exact_match"] for k in mine])}
    ours, theirs = [records[k]["exact_match"] for k in keys], [base[k]["exact_match"] for k in keys]
    ratio = paired_bootstrap_runs([ours], [theirs], np.divide) if any(theirs) else None
    return {"n": len(keys), "exact_match_diff": paired_bootstrap(em), "loss_diff": paired_bootstrap(loss),
            "exact_match_ratio": ratio, "modalities": modalities}


def distillation_effect(teacher: dict[str, dict], plain: dict[str, dict], student, control=None) -> dict:
    """What distillation bought, from per-sample records (`read_records`) on the same samples: the student's and
    the plain quantised export's exact match as fractions of the teacher's (None where the teacher's is 0), and
    student minus plain, each with a paired bootstrap 95 % interval over the samples all of them evaluated;
    `verdict` says it in one sentence.

    student: one student's records or a list of them (students of one recipe, e.g. seeds: the interval then
    resamples them too). control: optional, the same recipe trained without the KL term (`distill.alpha=0`),
    one or a list: it separates the teacher's soft targets from the extra training steps, as
    `student_minus_control` and `kl_verdict`."""
    students = student if isinstance(student, list) else [student]
    controls = control if isinstance(control, list) else [control] if control is not None else []
    keys = sorted(set.intersection(*(set(r) for r in (teacher, plain, *students, *controls))))
    if not keys:
        raise UserError("distillation: the teacher, the plain export and the student share no evaluated samples; "
                        "evaluate them on the same shards (data.eval=SHARDS).")

    def em_of(records):
        return [records[k]["exact_match"] for k in keys]

    em = {"teacher": [em_of(teacher)], "plain": [em_of(plain)], "student": [em_of(r) for r in students],
          "control": [em_of(r) for r in controls]}
    keeps = {name: paired_bootstrap_runs(em[name], em["teacher"], np.divide) if any(em["teacher"][0]) else None
             for name in ("student", "plain")}
    gain = paired_bootstrap_runs(em["student"], em["plain"])
    effect = ("distillation adds nothing measurable" if gain[1] <= 0 <= gain[2]
              else "distillation adds a measurable gain" if gain[1] > 0 else "distillation costs exact match")
    kept = (f"The distilled student keeps {_share(keeps['student'])} of the teacher's exact match, the plain "
            f"quantised export {_share(keeps['plain'])}" if any(em["teacher"][0])
            else "The teacher has no exact match on these samples (no fraction of it to keep)")
    runs = f" ({len(students)} student runs)" if len(students) > 1 else ""
    verdict = (f"{kept}; student minus plain {gain[0]:+.3f} [{gain[1]:+.3f}, {gain[2]:+.3f}] exact match on "
               f"{len(keys)} paired samples{runs} (95 % paired bootstrap): {effect}.")
    result = {"n": len(keys), "students": len(students), "student_keeps": keeps["student"],
              "plain_keeps": keeps["plain"], "student_minus_plain": gain, "verdict": verdict}
    if controls:
        kl = paired_bootstrap_runs(em["student"], em["control"])
        kl_effect = ("the KL term adds nothing measurable over the same steps without it" if kl[1] <= 0 <= kl[2]
                     else "the KL term adds a measurable gain" if kl[1] > 0 else "the KL term costs exact match")
        result.update(controls=len(controls), student_minus_control=kl, kl_verdict=(
            f"Student minus control (the same steps, cross-entropy only): {kl[0]:+.3f} [{kl[1]:+.3f}, {kl[2]:+.3f}] "
            f"exact match ({len(students)} vs {len(controls)} runs, 95 % bootstrap over runs and samples): "
            f"{kl_effect}."))
    return result


def _share(interval: list[float]) -> str:
    return f"{interval[0]:.1%} [{interval[1]:.1%}, {interval[2]:.1%}]"


def compare_runs(run_dirs: list[Path], results: list[dict]) -> dict:
    """The comparison of runs already evaluated (results[i] is run_dirs[i]'s evaluate() output)."""
    labels = run_labels(run_dirs)
    records = [read_records(d) for d in run_dirs]
    runs = [{"run": str(d), "label": label, "cost": cost_of(d), "overall": r["overall"],
             "modalities": r.get("modalities", {})} for d, label, r in zip(run_dirs, labels, results)]
    pairs = [{"run": str(d), "against": str(run_dirs[0]), **paired(rec, records[0])}
             for d, rec in zip(run_dirs[1:], records[1:])]
    return {"runs": runs, "paired": pairs}


def _num(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def print_comparison(comparison: dict) -> None:
    runs = comparison["runs"]
    modalities = sorted({m for r in runs for m in r["modalities"]})
    print(f"\n{'run':<28} {'trainable':>10} {'proj FLOPs':>10} {'loss':>7} {'EM':>6} {'CER':>6} {'WER':>6}"
          + "".join(f" {'EM ' + m:>9}" for m in modalities))
    for r in runs:
        cost, o = r["cost"], r["overall"]
        print(f"{r['label'][:28]:<28} {_num(cost.get('trainable_params'), ','):>10} "
              f"{_num(cost.get('projector_flops_per_sample'), '.3g'):>10} {o['loss']:>7.4f} "
              f"{o['exact_match']:>6.3f} {o['cer']:>6.3f} {o['wer']:>6.3f}"
              + "".join(f" {_num(r['modalities'].get(m, {}).get('exact_match'), '.3f'):>9}" for m in modalities))
    base = runs[0]["label"]
    for r, p in zip(runs[1:], comparison["paired"]):
        em, loss = p["exact_match_diff"], p["loss_diff"]
        print(f"{r['label']} minus {base} on {p['n']} paired samples (95 % paired bootstrap): exact match "
              f"{em[0]:+.3f} [{em[1]:+.3f}, {em[2]:+.3f}] ({_direction(em)}), loss {loss[0]:+.4f} "
              f"[{loss[1]:+.4f}, {loss[2]:+.4f}] ({_direction(loss)})"
              + (f"; keeps {_share(p['exact_match_ratio'])} of its exact match" if p.get("exact_match_ratio") else ""))
        if len(p["modalities"]) > 1:  # a difference in one modality can hide in the overall figure
            for modality, m in p["modalities"].items():
                d = m["exact_match_diff"]
                print(f"  {modality} ({m['n']} samples): exact match {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}] "
                      f"({_direction(d)})")


def _direction(interval: list[float]) -> str:
    return "higher" if interval[1] > 0 else "lower" if interval[2] < 0 else "no clear difference"
