"""Sweep report entry point: `python -m gemma_fusion.report SWEEP_DIR [--fit]` (`--help` lists the keys; what the
report holds: gemma_fusion/eval/report.py)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gemma_fusion.core.cli import option, parse_cli
from gemma_fusion.eval.report import power_law_fit, write_report

__all__ = ["ReportOptions", "main", "power_law_fit", "write_report"]


@dataclass
class ReportOptions:
    """A sweep's report: SWEEP_DIR/report.md and report.json (a row per design with intervals, the winner or "no
    clear winner"), and its PNG plots."""

    sweep_dir: Path = option(help="a hydra.sweep.dir of `python train.py -m ...`", positional=True,
                             metavar="SWEEP_DIR")
    fit: bool | None = option(None, "fit a power law to loss against compute (null: when the sweep is "
                                    "experiment=scaling)")


def main(argv: list[str] | None = None) -> None:
    opts = parse_cli(ReportOptions, argv, prog="python -m gemma_fusion.report")
    if not opts.sweep_dir.is_dir():
        raise SystemExit(f"report: {opts.sweep_dir} is not a directory; pass the hydra.sweep.dir of a sweep.")
    print(write_report(opts.sweep_dir, opts.fit))


if __name__ == "__main__":
    main()
