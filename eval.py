"""Evaluate a trained run: `python eval.py run=RUN [data.eval=SHARDS]` -> table + RUN/eval.json.

`compare=[RUN_B,...]` evaluates every run on the same shards and compares them side by side with paired
bootstrap intervals -> RUN/eval_compare.json (gemma_fusion/eval/compare.py).
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from gemma_fusion.core.config import CONFIG_DIR, check_cli_overrides
from gemma_fusion.core.errors import exit_on_user_error


def run(cfg: DictConfig) -> dict:
    """RUN's evaluation (RUN/eval.json), or with `compare` the comparison (RUN/eval_compare.json)."""
    import json
    from pathlib import Path

    from gemma_fusion.core.errors import UserError
    from gemma_fusion.eval.compare import compare_runs, print_comparison
    from gemma_fusion.eval.evaluate import evaluate_into
    from gemma_fusion.artifacts.load import load_for_inference

    run_dirs = [Path(cfg.run), *map(Path, cfg.compare or [])]
    results, val_sets = [], set()
    for run_dir in run_dirs:
        model, run_cfg = load_for_inference(run_dir, cfg.trust_remote_code)  # a train.py run or an export
        val_sets.add(str(run_cfg.data.val))
        if cfg.data.eval is None and len(val_sets) > 1:
            raise UserError(f"compare: {run_dirs[0]} and {run_dir} were validated on different data "
                            f"({' and '.join(sorted(val_sets))}); pass data.eval=SHARDS to evaluate both on the same.")
        print(f"\n{run_dir}:")
        results.append(evaluate_into(run_dir, model, run_cfg.data, cfg.data.eval, cfg.data.batch_size,
                                     cfg.max_new_tokens))
        del model
    if len(run_dirs) == 1:
        return results[0]
    comparison = compare_runs(run_dirs, results)
    (run_dirs[0] / "eval_compare.json").write_text(json.dumps(comparison, indent=2))
    print_comparison(comparison)
    return comparison


@hydra.main(config_path=CONFIG_DIR, config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(run, cfg)


if __name__ == "__main__":
    check_cli_overrides("eval", sys.argv[1:])
    main()
