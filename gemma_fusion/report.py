"""Sweep report entry point: `python -m gemma_fusion.report SWEEP_DIR [--fit]` (gemma_fusion/eval/report.py)."""
from gemma_fusion.eval.report import main, power_law_fit, write_report

__all__ = ["main", "power_law_fit", "write_report"]

if __name__ == "__main__":
    main()
