"""Side-by-side comparison of runs evaluated on the same samples: `python eval.py run=A compare=[B,C]`.

Each run is evaluated with its own preprocessing on the same shards (`evaluate_into`); this module pairs
their per-sample records by sample key and reports, per run: what it costs (trainable parameters, soft
tokens per image / audio second, forward FLOPs per sample, from `RUN/compute.json`) and held-out loss,
exact match, CER and WER, overall and per modality; then, for every other run against the first, the
difference in exact match and in per-sample loss with a paired bootstrap 95 % interval, so a user can
tell a real difference from the noise of a few hundred samples.

Writes `A/eval_compare.json` = {"runs": [{"run", "label", "cost", "overall", "modalities"}, ...],
"paired": [{"run", "against", "n", "exact_match_diff": [mean, lo, hi], "loss_diff": [mean, lo, hi],
"modalities": {"image": {"n", "exact_match_diff"}, ...}}]}.
"""
from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

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


def paired_bootstrap(diffs: list[float], seed: int = 0, samples: int = BOOTSTRAP_SAMPLES) -> list[float]:
    """[mean, 2.5 %, 97.5 %] of the mean of per-sample differences, resampling samples with replacement."""
    rng, n = random.Random(seed), len(diffs)
    means = sorted(statistics.fmean(rng.choices(diffs, k=n)) for _ in range(samples))
    return [statistics.fmean(diffs), means[int(0.025 * samples)], means[int(0.975 * samples) - 1]]


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
    return {"n": len(keys), "exact_match_diff": paired_bootstrap(em), "loss_diff": paired_bootstrap(loss),
            "modalities": modalities}


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
              f"[{loss[1]:+.4f}, {loss[2]:+.4f}] ({_direction(loss)})")
        if len(p["modalities"]) > 1:  # a difference in one modality can hide in the overall figure
            for modality, m in p["modalities"].items():
                d = m["exact_match_diff"]
                print(f"  {modality} ({m['n']} samples): exact match {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}] "
                      f"({_direction(d)})")


def _direction(interval: list[float]) -> str:
    return "higher" if interval[1] > 0 else "lower" if interval[2] < 0 else "no clear difference"
