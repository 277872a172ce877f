"""A sweep's report: `python -m gemma_fusion.report DIR` -> DIR/report.md and PNG plots.

DIR is a `python train.py -m ... hydra.sweep.dir=DIR` directory: one run per job (`DIR/<n>/` with
its overrides, config, compute report, metrics and evaluation: `RunDir`). Runs that differ
only in `seed` form one design; every figure is the mean ± standard deviation over its seeds.

Writes:
  report.md               one row per design: parameters, soft tokens, forward FLOPs, final training loss,
                          held-out loss and exact match (overall and per modality), and which design won
  loss_curves.png         training loss against step, per design (mean over seeds, smoothed)
  metric_vs_compute.png   held-out exact match against training compute
  scaling.png             (sweeps that vary the compute, `--fit`, or `experiment=scaling`) held-out loss
                          against training compute with a power-law fit L = a * C^b, its exponent b and
                          a 95 % confidence interval
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

import yaml

from gemma_fusion.artifacts.rundir import RunDir, SweepDir

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
    return Run(path, "", int(config.get("seed", 0)), compute, json.loads(needed[4].read_text()),
               losses, flops, overrides)


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


def _fmt(stat: tuple[float, float] | None, digits: int = 3, scientific: bool = False) -> str:
    if stat is None:
        return "–"
    mean, std = stat
    if scientific:
        return f"{mean:.3g} ± {std:.2g}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _em(run: Run, modality: str | None) -> float | None:
    section = run.evaluation["overall"] if modality is None else run.evaluation.get("modalities", {}).get(modality)
    return None if section is None else section["exact_match"]


def summarise(groups: dict[str, list[Run]]) -> list[dict]:
    """One row of statistics per design."""
    rows = []
    for design, runs in groups.items():
        params = runs[0].compute["parameters"]
        flops = runs[0].compute["forward_flops_per_sample"]
        rows.append({
            "design": design, "seeds": sorted(r.seed for r in runs),
            "trainable": sum(p["trainable"] for p in params.values()),
            "frozen": sum(p["frozen"] for p in params.values()),
            "projector_flops": flops["vision"] + flops["audio"], "backbone_flops": flops["backbone"],
            "tokens_per_image": runs[0].compute["tokens"]["per_image"],
            "tokens_per_audio_second": runs[0].compute["tokens"]["per_audio_second"],
            "training_flops": mean_std([r.training_flops for r in runs]),
            "final_loss": mean_std([r.final_loss for r in runs]),
            "eval_loss": mean_std([r.evaluation["overall"]["loss"] for r in runs]),
            "em": mean_std([_em(r, None) for r in runs]),
            "em_image": mean_std([_em(r, "image") for r in runs]),
            "em_audio": mean_std([_em(r, "audio") for r in runs]),
        })
    return rows


def verdict(rows: list[dict]) -> list[str]:
    """Which design won: by held-out loss (continuous, so it ranks designs even where exact match is still
    near zero), with exact match beside it; and whether the margin exceeds the seeds' spread."""
    ranked = sorted((r for r in rows if r["eval_loss"] is not None), key=lambda r: r["eval_loss"][0])
    if len(ranked) < 2:
        return []
    best, second, worst = ranked[0], ranked[1], ranked[-1]
    margin = second["eval_loss"][0] - best["eval_loss"][0]
    spread = max(best["eval_loss"][1], second["eval_loss"][1])
    by_em = max((r for r in rows if r["em"] is not None), key=lambda r: r["em"][0], default=None)
    lines = [f"**Lowest held-out loss: {best['design']}** ({_fmt(best['eval_loss'])}, exact match {_fmt(best['em'])}), "
             f"{margin:.3f} below the runner-up {second['design']} ({_fmt(second['eval_loss'])}) — "
             + ("more than" if margin > spread else "within") + f" the seeds' spread ({spread:.3f}); highest: "
             f"{worst['design']} ({_fmt(worst['eval_loss'])})."]
    if by_em is not None:
        lines.append(f"Best held-out exact match: {by_em['design']} ({_fmt(by_em['em'])}).")
    return lines


def power_law_fit(compute: list[float], loss: list[float]) -> dict:
    """Least squares of log L = log a + b log C: {"a", "b", "b_low", "b_high", "r2", "n"} (95 % interval of b
    from the slope's standard error and Student's t with n - 2 degrees of freedom)."""
    if len(compute) < 3:
        raise ValueError("a power-law fit needs at least 3 points")
    xs, ys = [math.log(c) for c in compute], [math.log(v) for v in loss]
    n, mx, my = len(xs), statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("a power-law fit needs runs of different compute")
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    residual = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    total = sum((y - my) ** 2 for y in ys)
    se = math.sqrt(residual / (n - 2) / sxx) if n > 2 else float("inf")
    from scipy.stats import t  # scipy loads in seconds: only when a fit is asked for

    half = t.ppf(0.975, n - 2) * se
    return {"a": math.exp(a), "b": b, "b_low": b - half, "b_high": b + half,
            "r2": 1 - residual / total if total else 1.0, "n": n}


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
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_metric_vs_compute(rows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt  # after matplotlib.use('Agg') in write_report; slow to import

    fig, ax = plt.subplots(figsize=(8, 5))
    for row in rows:
        if row["em"] is None:
            continue
        (c, c_std), (em, em_std) = row["training_flops"], row["em"]
        ax.errorbar(c, em, xerr=c_std, yerr=em_std, fmt="o", capsize=3, label=row["design"])
    ax.set(xlabel="training compute (FLOPs, ≈ 3 × forward × samples)", ylabel="held-out exact match", xscale="log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_scaling(groups: dict[str, list[Run]], fit: dict, path: Path) -> None:
    import matplotlib.pyplot as plt  # after matplotlib.use('Agg') in write_report; slow to import

    fig, ax = plt.subplots(figsize=(8, 5))
    for design, runs in groups.items():
        ax.scatter([r.training_flops for r in runs], [r.evaluation["overall"]["loss"] for r in runs], label=design)
    xs = sorted(r.training_flops for runs in groups.values() for r in runs)
    ax.plot(xs, [fit["a"] * x ** fit["b"] for x in xs], "k--",
            label=f"L = {fit['a']:.3g} C^{fit['b']:.3f} (95 % CI {fit['b_low']:.3f} … {fit['b_high']:.3f})")
    ax.set(xlabel="training compute (FLOPs)", ylabel="held-out loss", xscale="log", yscale="log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(sweep_dir: str | Path, fit: bool | None = None) -> Path:
    """Write DIR/report.md and the plots; returns the report's path. `fit=None`: fit a power law when the
    sweep is `experiment=scaling`."""
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
    lines = [f"# Sweep report: {sweep_dir}", "",
             f"{len(runs)} runs, {len(groups)} designs; mean ± std over seeds. Reproduce: "
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
            f"| {_fmt(row['training_flops'], scientific=True)} | {_fmt(row['final_loss'])} | {_fmt(row['eval_loss'])} "
            f"| {_fmt(row['em'])} | {_fmt(row['em_image'])} | {_fmt(row['em_audio'])} |")
    lines += ["", *verdict(rows)]
    lines += ["", f"![training loss]({sweep.loss_curves.name})", "",
              f"![exact match against compute]({sweep.metric_vs_compute.name})"]
    if fit:
        result = power_law_fit([r.training_flops for r in runs], [r.evaluation["overall"]["loss"] for r in runs])
        plot_scaling(groups, result, sweep.scaling)
        lines += ["", f"Power law over {result['n']} runs: held-out loss = {result['a']:.4g} × C^{result['b']:.4f} "
                      f"(exponent 95 % CI {result['b_low']:.4f} … {result['b_high']:.4f}, R² {result['r2']:.3f}).",
                  "", f"![scaling]({sweep.scaling.name})"]
    path = sweep.report
    path.write_text("\n".join(lines) + "\n")
    return path

