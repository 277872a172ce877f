"""Train projectors (+ LoRA) on a frozen backbone: `python train.py [overrides]` (see configs/train.yaml).

The recipe (checks, preparation, model, loaders, Trainer, fit, final weights, evaluation) is
gemma_fusion/training/recipe.py; this file is its command line.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from gemma_fusion.core.config import CONFIG_DIR, check_cli_overrides
from gemma_fusion.core.errors import exit_on_user_error
from gemma_fusion.training import recipe


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    # torchrun and srun start all ranks at once, each resolving its own runs/${now:...}; Lightning's own
    # launcher (python train.py trainer=ddp) hands rank 0's directory to the ranks it starts.
    ranks = int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)
    if ranks > 1 and not any(o.startswith("hydra.run.dir=") for o in hydra_cfg.overrides.hydra):
        sys.exit("error: with several processes pass hydra.run.dir=RUN (e.g. runs/$SLURM_JOB_ID) so that every "
                 "rank uses the same run directory; resume=auto looks for checkpoints there.")
    exit_on_user_error(recipe.run, cfg, Path(hydra_cfg.runtime.output_dir))


if __name__ == "__main__":
    check_cli_overrides("train", sys.argv[1:])
    main()
