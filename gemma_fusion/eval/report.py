"""A sweep's report: `python -m gemma_fusion.report DIR` -> DIR/report.md, DIR/report.json and PNG plots.

DIR is a `python train.py -m ... hydra.sweep.dir=DIR` directory: one run per job (`DIR/<n>/` with
its overrides, config, compute report, metrics, evaluation and per-sample records: `RunDir`). Runs that differ
only in `seed` form one design.

Writes:
  report.md               one row per design: parameters, soft tokens, forward FLOPs, final training loss
                          (mean ± std over seeds), held-out loss and exact match (overall and per modality) with a
                          95 % Student-t interval over seeds; then, for exact match and for loss, every design
                          against the best one with a 95 % paired bootstrap interval over evaluation samples and
                          seeds, a winner named only where every interval excludes zero, else "no clear winner"
  report.json             the same figures: {"sweep", "runs", "common_overrides", "designs": [row, ...],
                          "comparisons": {"exact_match": {...}, "loss": {...}}, "fit": {...} or null}
  loss_curves.png         training loss against step, per design (mean over seeds, smoothed)
  metric_vs_compute.png   held-out exact match against training compute
  scaling.png             (`--fit`, or `experiment=scaling`) held-out loss against training compute with a power-law
  scaling_residuals.png   fit L = a * C^b, its exponent's 95 % interval from a bootstrap over runs, and R²; the
                          residuals of the fit against compute
Training compute of a run = 3 x forward FLOPs per sample (compute.json) x samples trained (steps x batch):
the usual forward + backward estimate.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from gemma_fusion.artifacts.rundir import RunDir, SweepDir
from gemma_fusion.eval.compare import BOOTSTRAP_SAMPLES, paired_bootstrap_runs, percentile_interval, read_records

IGNORED_OVERRIDES = ("seed=", "experiment=", "hydra.", "data.train=", "data.val=", "backbone.path=")


@dataclass
class Run:
    path: Path
    design: str
    seed: int
    compute: dict
    evaluation: dict
    losses: list[tuple[int, float]]
    training_flops: float
    overrides: list[str] = field(default_factory=list)
    records: dict[str, dict] | None = None  # per-sample evaluation records by sample key (None: not written)

    @property
    def final_loss(self) -> float:
        """Mean training loss over the last 10 % of the logged steps (at least the last one)."""
        tail = max(1, len(self.losses) // 10)
        return statistics.fmean(loss for _, loss in self.losses[-tail:])


def design_of(overrides: list[str], common: set[str]) -> str:
    """The overrides that name a design: those that vary across the sweep, but the seed and paths."""
    kept = [o for o in overrides if o not in common and not o.startswith(IGNORED_OVERRIDES)]
    return " ".join(sorted(kept)) or "default"


def load_run(path: Path) -> Run | None:
    """One finished run of the sweep, or None (and a note on stderr) if its files are incomplete."""
    run = RunDir(path)
    needed = [run.overrides, run.config, run.compute, run.metrics, run.eval]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        print(f"report: skipping {path} (no {', '.join(missing)}: not finished?)", file=sys.stderr)
        return None
    overrides = yaml.safe_load(needed[0].read_text()) or []
    config = yaml.safe_load(needed[1].read_text())
    compute = json.loads(needed[2].read_text())
    with needed[3].open(newline="") as f:
        losses = [(int(r["step"]), float(r["train/loss"])) for r in csv.DictReader(f) if r.get("train/loss")]
    samples = config["trainer"]["max_steps"] * config["data"]["batch_size"]
    flops = 3 * compute["forward_flops_per_sample"]["total"] * samples
    records = read_records(path) if run.predictions.is_file() else None
    return Run(path, "", int(config.get("seed", 0)), compute, json.loads(needed[4].read_text()),
               losses, flops, overrides, records)


def load_sweep(sweep_dir: Path) -> tuple[dict[str, list[Run]], list[str]]:
    """(runs of the sweep grouped by design in the order the sweep ran them, the overrides all runs share)."""
    jobs = [job.root for job in SweepDir(sweep_dir).jobs()]
    runs = [run for run in map(load_run, jobs) if run is not None]
    if not runs:
        layout = RunDir("<n>")
        raise SystemExit(f"report: no finished runs under {sweep_dir} (expected {layout.hydra}, "
                         f"{layout.compute.name}, {layout.eval.name})")
    common = set.intersection(*(set(r.overrides) for r in runs)) if len(runs) > 1 else set()
    groups: dict[str, list[Run]] = {}
    for run in runs:
        run.design = design_of(run.overrides, common)
        groups.setdefault(run.design, []).append(run)
    return groups, sorted(common)


def mean_std(values: list[float | None]) -> tuple[float, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def t_interval(values: list[float | None]) -> list[float | None] | None:
    """[mean, low, high]: the 95 % Student-t interval of the mean over seeds (n - 1 degrees of freedom); low and
    high are None for a single seed (no spread to measure)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    mean = statistics.fmean(values)
    if len(values) < 2:
        return [mean, None, None]
    from scipy.stats import t  # scipy takes a second to import: only when a report is written

    half = t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return [mean, mean - half, mean + half]


def _fmt(stat: tuple[float, float] | None, digits: int = 3, scientific: bool = False) -> str:
    if stat is None:
        return "–"
    mean, std = stat
    if scientific:
        return f"{mean:.3g} ± {std:.2g}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _fmt_ci(interval: list[float | None] | None, digits: int = 3, signed: bool = False) -> str:
    if interval is None:
        return "–"
    f = f"{'+' if signed else ''}.{digits}f"
    mean, low, high = interval
    return format(mean, f) + ("" if low is None else f" [{low:{f}}, {high:{f}}]")


def _em(run: Run, modality: str | None) -> float | None:
    section = run.evaluation["overall"] if modality is None else run.evaluation.get("modalities", {}).get(modality)
    return None if section is None else section["exact_match"]


def summarise(groups: dict[str, list[Run]]) -> list[dict]:
    """One row of statistics per design: `(mean, std)` over seeds, and `*_ci` = [mean, low, high] (`t_interval`)."""
    rows = []
    for design, runs in groups.items():
        params = runs[0].compute["parameters"]
        flops = runs[0].compute["forward_flops_per_sample"]
        metrics = {"eval_loss": [r.evaluation["overall"]["loss"] for r in runs], "em": [_em(r, None) for r in runs],
                   "em_image": [_em(r, "image") for r in runs], "em_audio": [_em(r, "audio") for r in runs]}
        rows.append({
            "design": design, "seeds": sorted(r.seed for r in runs),
            "trainable": sum(p["trainable"] for p in params.values()),
            "frozen": sum(p["frozen"] for p in params.values()),
            "projector_flops": flops["vision"] + flops["audio"], "backbone_flops": flops["backbone"],
            "tokens_per_image": runs[0].compute["tokens"]["per_image"],
            "tokens_per_audio_second": runs[0].compute["tokens"]["per_audio_second"],
            "training_flops": mean_std([r.training_flops for r in runs]),
            "final_loss": mean_std([r.final_loss for r in runs]),
            **{name: mean_std(values) for name, values in metrics.items()},
            **{f"{name}_ci": t_interval(values) for name, values in metrics.items()},
        })
    return rows


# metric of the per-sample records -> (its name in the report, whether higher is better)
COMPARED = {"exact_match": ("Held-out exact match", True), "loss": ("Held-out loss (per-sample mean)", False)}


def compare_designs(groups: dict[str, list[Run]], metric: str) -> dict:
    """Every design against the best one on `metric` (a key of COMPARED): the difference (design minus best) with a
    95 % paired bootstrap interval over the evaluation samples every run scored and over each design's seeds; the
    best design is the winner only where every interval excludes zero.

    Returns {"metric", "best", "winner" (null: no clear winner), "n_samples", "designs": {design: mean},
    "against_best": [{"design", "seeds", "diff": [mean, lo, hi], "clear"}], "verdict"}; without per-sample
    records in every run, only "metric" and "verdict".
    """
    name, higher_is_better = COMPARED[metric]
    runs = [r for rs in groups.values() for r in rs]
    lacking = [str(r.path) for r in runs if r.records is None]
    keys = sorted(set.intersection(*(set(r.records) for r in runs))) if not lacking else []
    if lacking or not keys:
        why = (f"no per-sample records ({RunDir(lacking[0]).predictions.name}) in {', '.join(lacking)}" if lacking
               else "the runs share no evaluated samples")
        return {"metric": metric, "verdict": f"{name}: no paired comparison ({why}); evaluate every run on the same "
                                             f"samples (eval_after_train, or eval.py data.eval=SHARDS)."}
    values = {d: np.array([[r.records[k][metric] for k in keys] for r in rs]) for d, rs in groups.items()}
    means = {d: float(v.mean()) for d, v in values.items()}
    best = (max if higher_is_better else min)(means, key=means.get)
    against = []
    for design, v in values.items():
        if design != best:
            diff = paired_bootstrap_runs(v, values[best])
            against.append({"design": design, "seeds": len(v), "diff": diff, "clear": not diff[1] <= 0 <= diff[2]})
    against.sort(key=lambda a: abs(a["diff"][0]))
    how = (f"95 % paired bootstrap over {len(keys)} evaluation samples and the seeds, {BOOTSTRAP_SAMPLES} "
           f"resamples")
    unclear = [a for a in against if not a["clear"]]
    if not against:
        verdict = f"{name}: one design, nothing to compare."
    elif unclear:
        within = "; ".join(f"{a['design']} {_fmt_ci(a['diff'], signed=True)}" for a in unclear)
        verdict = (f"**{name}: no clear winner.** {best} has the best mean ({means[best]:.3f}), but the "
                   f"difference to {within} includes zero ({how}).")
    else:
        verdict = (f"**{name}: {best} wins** ({means[best]:.3f}): every other design is behind with an interval "
                   f"that excludes zero; the closest, {against[0]['design']}: "
                   f"{_fmt_ci(against[0]['diff'], signed=True)} ({how}).")
    return {"metric": metric, "best": best, "winner": None if unclear or not against else best,
            "n_samples": len(keys), "designs": means, "against_best": against, "verdict": verdict}


def power_law_fit(compute: list[float], loss: list[float], seed: int = 0, samples: int = BOOTSTRAP_SAMPLES) -> dict:
    """Least squares of log L = log a + b log C over runs: {"a", "b", "b_low", "b_high", "r2", "n",
    "distinct_compute", "residuals"}. The exponent's 95 % interval is the percentile interval of b refitted on
    `samples` resamples of the runs with replacement (a resample whose runs all share one compute has no slope and
    is drawn again); R² and the residuals (log L - fit) are of the fit to all runs."""
    x, y = np.log(np.asarray(compute, dtype=float)), np.log(np.asarray(loss, dtype=float))
    if len(x) < 3:
        raise ValueError("a power-law fit needs at least 3 points")
    if np.ptp(x) == 0:
        raise ValueError("a power-law fit needs runs of different compute")
    b = float(_slopes(x[None], y[None])[0])
    a = float(y.mean() - b * x.mean())
    residuals = y - a - b * x
    total = float(((y - y.mean()) ** 2).sum())
    rng, slopes = np.random.default_rng(seed), []
    while len(slopes) < samples:
        rows = rng.integers(0, len(x), (samples, len(x)))
        xs = x[rows]
        varied = np.ptp(xs, axis=1) > 0
        slopes.extend(_slopes(xs[varied], y[rows][varied]).tolist())
    _, low, high = percentile_interval(b, slopes[:samples])
    return {"a": math.exp(a), "b": b, "b_low": low, "b_high": high,
            "r2": 1 - float((residuals ** 2).sum()) / total if total else 1.0, "n": len(x),
            "distinct_compute": len(set(compute)), "residuals": residuals.tolist()}


def _slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares slope of each row of y against the same row of x."""
    dx = x - x.mean(1, keepdims=True)
    return (dx * (y - y.mean(1, keepdims=True))).sum(1) / (dx ** 2).sum(1)


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def plot_loss_curves(groups: dict[str, list[Run]], path: Path) -> None:
    import matplotlib.pyplot as plt  # after matplotlib.use('Agg') in write_report; slow to import

    fig, ax = plt.subplots(figsize=(8, 5))
    for design, runs in groups.items():
        steps = sorted(set.intersection(*(set(s for s, _ in r.losses) for r in runs)))
        by_run = [dict(r.losses) for r in runs]
        mean = [statistics.fmean(d[s] for d in by_run) for s in steps]
        ax.plot(steps, _smooth(mean, max(1, len(steps) // 50)), label=f"{design} (n={len(runs)})")
    ax.set(xlabel="step", ylabel="training loss (mean over seeds, smoothed)", yscale="log")
    _save(fig, ax, path)


def plot_metric_vs_compute(rows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt  # after matplotlib.use('Agg') in write_report; slow to import

    fig, ax = plt.subplots(figsize=(8, 5))
    for row in rows:
        if row["em_ci"] is None:
            continue
        (c, c_std), (em, low, high) = row["training_flops"], row["em_ci"]
        yerr = None if low is None else [[em - low], [high - em]]
        ax.errorbar(c, em, xerr=c_std, yerr=yerr, fmt="o", capsize=3, label=row["design"])
    ax.set(xlabel="training compute (FLOPs, ≈ 3 × forward × samples)",
           ylabel="held-out exact match (95 % t-interval over seeds)", xscale="log")
    _save(fig, ax, path)


def plot_scaling(groups: dict[str, list[Run]], fit: dict, path: Path, residuals_path: Path) -> None:
    """The fit over the runs (`path`) and its residuals log L - log fit against compute (`residuals_path`)."""
    import matplotlib.pyplot as plt  # after matplotlib.use('Agg') in write_report; slow to import

    fig, ax = plt.subplots(figsize=(8, 5))
    for design, runs in groups.items():
        ax.scatter([r.training_flops for r in runs], [r.evaluation["overall"]["loss"] for r in runs], label=design)
    xs = sorted(r.training_flops for runs in groups.values() for r in runs)
    ax.plot(xs, [fit["a"] * x ** fit["b"] for x in xs], "k--",
            label=f"L = {fit['a']:.3g} C^{fit['b']:.3f} (95 % CI {fit['b_low']:.3f} … {fit['b_high']:.3f}, "
                  f"bootstrap over runs; R² {fit['r2']:.2f})")
    ax.set(xlabel="training compute (FLOPs)", ylabel="held-out loss", xscale="log", yscale="log")
    _save(fig, ax, path)

    fig, ax = plt.subplots(figsize=(8, 4))
    runs = [r for rs in groups.values() for r in rs]
    residual_of = dict(zip(map(id, runs), fit["residuals"]))  # the fit's order: the runs' order in groups
    for design, design_runs in groups.items():
        ax.scatter([r.training_flops for r in design_runs], [residual_of[id(r)] for r in design_runs], label=design)
    ax.axhline(0, color="k", linestyle="--", linewidth=1)
    ax.set(xlabel="training compute (FLOPs)", ylabel="residual: log held-out loss − log fit", xscale="log",
           title=f"residuals of the power-law fit (R² {fit['r2']:.3f}, {fit['n']} runs)")
    _save(fig, ax, residuals_path)


def _save(fig, ax, path: Path) -> None:
    """Legend, layout, `path` as PNG, and the figure closed."""
    import matplotlib.pyplot as plt  # after matplotlib.use('Agg') in write_report; slow to import

    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(sweep_dir: str | Path, fit: bool | None = None) -> Path:
    """Write DIR/report.md, DIR/report.json and the plots; returns the report's path. `fit=None`: fit a power law
    when the sweep is `experiment=scaling`."""
    import matplotlib  # slow to import: only when a report is written

    matplotlib.use("Agg")
    sweep_dir = Path(sweep_dir)
    sweep = SweepDir(sweep_dir)
    groups, common = load_sweep(sweep_dir)
    rows = summarise(groups)
    runs = [r for rs in groups.values() for r in rs]
    if fit is None:
        fit = any(o == "experiment=scaling" for r in runs for o in r.overrides)
    plot_loss_curves(groups, sweep.loss_curves)
    plot_metric_vs_compute(rows, sweep.metric_vs_compute)
    heldout = heldout_data(runs)
    lines = [f"# Sweep report: {sweep_dir}", "", heldout["sentence"], "",
             f"{len(runs)} runs, {len(groups)} designs. Held-out loss and exact match: mean over seeds [95 % "
             f"Student-t interval over seeds]; other columns: mean ± std over seeds. Reproduce: "
             f"`python -m gemma_fusion.report {sweep_dir}`. Overrides of every run: "
             f"`{' '.join(common) or 'none'}`.", "",
             "| design | seeds | trainable params | frozen params | tokens / image | tokens / audio s "
             "| projector FLOPs / sample | backbone FLOPs / sample | training FLOPs | final train loss "
             "| held-out loss | EM | EM image | EM audio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        tokens_image = "–" if row["tokens_per_image"] is None else f"{row['tokens_per_image']:.1f}"
        tokens_audio = "–" if row["tokens_per_audio_second"] is None else f"{row['tokens_per_audio_second']:.1f}"
        lines.append(
            f"| {row['design']} | {len(row['seeds'])} | {row['trainable']:,} | {row['frozen']:,} | {tokens_image} "
            f"| {tokens_audio} | {row['projector_flops']:.3g} | {row['backbone_flops']:.3g} "
            f"| {_fmt(row['training_flops'], scientific=True)} | {_fmt(row['final_loss'])} "
            f"| {_fmt_ci(row['eval_loss_ci'])} | {_fmt_ci(row['em_ci'])} | {_fmt_ci(row['em_image_ci'])} "
            f"| {_fmt_ci(row['em_audio_ci'])} |")
    comparisons = {metric: compare_designs(groups, metric) for metric in COMPARED} if len(groups) > 1 else {}
    if comparisons:
        lines += ["", "## Which design won", ""] + [c["verdict"] + "\n" for c in comparisons.values()]
        lines += _difference_table(comparisons)
    lines += ["", f"![training loss]({sweep.loss_curves.name})", "",
              f"![exact match against compute]({sweep.metric_vs_compute.name})"]
    result = None
    if fit:
        result = power_law_fit([r.training_flops for r in runs], [r.evaluation["overall"]["loss"] for r in runs])
        plot_scaling(groups, result, sweep.scaling, sweep.scaling_residuals)
        few = (f" Only {result['distinct_compute']} distinct compute values: the exponent rests on that many "
               f"points, whatever the number of runs." if result["distinct_compute"] < 4 else "")
        lines += ["", f"Power law over {result['n']} runs ({result['distinct_compute']} distinct compute values): "
                      f"held-out loss = {result['a']:.4g} × C^{result['b']:.4f} (exponent 95 % CI "
                      f"{result['b_low']:.4f} … {result['b_high']:.4f}, percentile bootstrap over runs, "
                      f"{BOOTSTRAP_SAMPLES} resamples; R² {result['r2']:.3f}).{few}",
                  "", f"![scaling]({sweep.scaling.name})", "", f"![residuals]({sweep.scaling_residuals.name})"]
    sweep.report_json.write_text(json.dumps({
        "sweep": str(sweep_dir), "runs": len(runs), "common_overrides": common, "heldout": heldout, "designs": rows,
        "comparisons": comparisons, "fit": result}, indent=2))
    path = sweep.report
    path.write_text("\n".join(lines) + "\n")
    return path


def heldout_data(runs: list[Run]) -> dict:
    """What the held-out columns were measured on: the split (and shards) each run's evaluation records
    (`"data"`, written by eval_after_train and eval.py), and one sentence saying it, or that the runs differ."""
    recorded = [r.evaluation.get("data") or {} for r in runs]
    seen = {(d.get("split"), json.dumps(d.get("shards"))) for d in recorded}  # shards: a string or a list
    splits = sorted({split or "unrecorded" for split, _ in seen})
    if not any(recorded):
        sentence = (f"Held-out data: not recorded in the runs' {RunDir(runs[0].path).eval.name} (made before the "
                    "test split): re-evaluate each with `python eval.py run=RUN data.eval=test`.")
    elif len(seen) == 1:
        split, shards = recorded[0].get("split"), recorded[0].get("shards")
        sentence = f"Held-out data: the runs' `{split or 'shards'}` split (`{shards}`), the same for every run."
    else:
        sentence = (f"**Held-out data differ between runs** ({', '.join(splits)}): the columns do not compare; "
                    "re-evaluate every run on one split with `python eval.py run=RUN data.eval=test`.")
    return {"splits": splits, "same": len(seen) == 1, "sentence": sentence}


def _difference_table(comparisons: dict) -> list[str]:
    """Each design's difference to the best on every compared metric (markdown), when the records allowed it."""
    done = {m: c for m, c in comparisons.items() if "against_best" in c}
    if not done:
        return []
    header = " | ".join(f"{COMPARED[m][0].lower()} minus {c['best']} [95 %]" for m, c in done.items())
    lines = [f"| design | {header} |", "|---|" + "---|" * len(done)]
    for design in {d: None for c in done.values() for d in c["designs"]}:
        cells = []
        for c in done.values():
            diff = next((a["diff"] for a in c["against_best"] if a["design"] == design), None)
            clear = diff is not None and not diff[1] <= 0 <= diff[2]
            cells.append("(best)" if diff is None else _fmt_ci(diff, signed=True) + (" (excludes 0)" if clear else ""))
        lines.append(f"| {design} | {' | '.join(cells)} |")
    return lines
