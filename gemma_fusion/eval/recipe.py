"""The evaluation recipe behind `python eval.py run=RUN [compare=[RUN_B,...]] [data.eval=SHARDS|val|test]`.

One run: greedy generation on its data.val (or data.eval: shards, or `test` for the run's data.test) -> `RunDir.eval`
and a table. With `compare`, every run on the same shards, side by side with paired bootstrap intervals ->
RUN/eval_compare.json (eval/compare.py).
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from gemma_fusion.artifacts.load import load_for_inference
from gemma_fusion.artifacts.rundir import RunDir
from gemma_fusion.core.errors import UserError
from gemma_fusion.eval.compare import compare_runs, print_comparison
from gemma_fusion.eval.evaluate import eval_shards, evaluate_into


def run(cfg: DictConfig) -> dict:
    """RUN's evaluation (`RunDir.eval`), or with `cfg.compare` the comparison (RUN/eval_compare.json), from
    configs/eval.yaml's keys: run, compare, data.eval, data.batch_size, max_new_tokens, trust_remote_code."""
    run_dirs = [Path(cfg.run), *map(Path, cfg.compare or [])]
    results, shard_sets = [], set()
    for run_dir in run_dirs:
        model, run_cfg = load_for_inference(run_dir, cfg.trust_remote_code)  # a train.py run or an export
        evaluated = eval_shards(run_cfg.data, cfg.data.eval)  # (each run's own data.val / data.test)
        shard_sets.add(str(evaluated["shards"]))
        if len(shard_sets) > 1:
            differ = "were validated on different data" if evaluated["split"] == "val" else "have different test splits"
            raise UserError(f"compare: {run_dirs[0]} and {run_dir} {differ} "
                            f"({' and '.join(sorted(shard_sets))}); pass data.eval=SHARDS to evaluate both on the same.")
        print(f"\n{run_dir}:")
        results.append(evaluate_into(run_dir, model, run_cfg.data, cfg.data.eval, cfg.data.batch_size,
                                     cfg.max_new_tokens))
        del model
    if len(run_dirs) == 1:
        return results[0]
    comparison = compare_runs(run_dirs, results)
    RunDir(run_dirs[0]).write_eval_compare(comparison)
    print_comparison(comparison)
    return comparison
