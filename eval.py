"""Evaluate a trained run: `python eval.py run=RUN [data.eval=SHARDS]` -> table + RUN/eval.json."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from gemma_fusion.config import CONFIG_DIR, check_cli_overrides
from gemma_fusion.errors import UserError


def run(cfg: DictConfig) -> dict:
    from gemma_fusion.data.pipeline import make_loader, preprocessor_for
    from gemma_fusion.eval.evaluate import evaluate, print_table
    from gemma_fusion.training.restore import load_run

    run_dir = Path(cfg.run)
    model, run_cfg = load_run(run_dir)
    data = run_cfg.data
    preprocess = preprocessor_for(model, data.image_tokens, data.audio_max_seconds)
    loader = make_loader(cfg.data.eval or data.val, preprocess, cfg.data.batch_size or data.eval_batch_size,
                         data.num_workers)
    result = evaluate(model, loader, cfg.max_new_tokens, predictions_path=run_dir / "eval_predictions.jsonl")
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
    print_table(result)
    return result


@hydra.main(config_path=CONFIG_DIR, config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except UserError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    check_cli_overrides("eval", sys.argv[1:])
    main()
