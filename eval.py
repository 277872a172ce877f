"""Evaluate a trained run: `python eval.py run=RUN [data.eval=SHARDS]` -> table + RUN/eval.json."""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from gemma_fusion.config import CONFIG_DIR, check_cli_overrides
from gemma_fusion.errors import exit_on_user_error


def run(cfg: DictConfig) -> dict:
    from gemma_fusion.eval.evaluate import evaluate_into
    from gemma_fusion.training.restore import load_run

    model, run_cfg = load_run(cfg.run)
    return evaluate_into(cfg.run, model, run_cfg.data, cfg.data.eval, cfg.data.batch_size, cfg.max_new_tokens)


@hydra.main(config_path=CONFIG_DIR, config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(run, cfg)


if __name__ == "__main__":
    check_cli_overrides("eval", sys.argv[1:])
    main()
