"""Evaluate a trained run: `python eval.py run=RUN [data.eval=SHARDS]` -> table + RUN/eval.json.

`compare=[RUN_B,...]` evaluates every run on the same shards and compares them side by side with paired
bootstrap intervals -> RUN/eval_compare.json. The recipe is gemma_fusion/eval/recipe.py; this file is its
command line (configs/eval.yaml).
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from gemma_fusion.core.config import CONFIG_DIR, check_cli_overrides
from gemma_fusion.core.errors import exit_on_user_error
from gemma_fusion.eval import recipe


@hydra.main(config_path=CONFIG_DIR, config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(recipe.run, cfg)


if __name__ == "__main__":
    check_cli_overrides("eval", sys.argv[1:])
    main()
