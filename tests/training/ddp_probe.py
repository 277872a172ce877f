"""Test-only entry point: train.py's Hydra app plus a callback that records what each rank did.

Lightning's launcher re-runs this script for the other ranks (torchrun starts it once per rank), so every
rank gets the callback. Rank r writes, into the run directory:
  rank{r}.keys.jsonl                 {"step", "keys"} of every batch it trained on
  rank{r}.{start,end}.safetensors    its trainable weights when fitting starts and ends
"""
from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.callbacks import Callback
from safetensors.torch import save_file

from gemma_fusion.training import callbacks as callbacks_module
from gemma_fusion.models.trainable import trainable_state_dict

BUILD_CALLBACKS = callbacks_module.build_callbacks
TRAIN_PY = Path(__file__).resolve().parents[2] / "train.py"


class RankRecorder(Callback):
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def _path(self, trainer, name: str) -> Path:
        return self.run_dir / f"rank{trainer.global_rank}.{name}"

    def on_train_start(self, trainer, pl_module) -> None:
        save_file(trainable_state_dict(pl_module.net), str(self._path(trainer, "start.safetensors")))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with self._path(trainer, "keys.jsonl").open("a") as f:
            f.write(json.dumps({"step": trainer.global_step, "keys": [m["key"] for m in batch["meta"]]}) + "\n")

    def on_train_end(self, trainer, pl_module) -> None:
        save_file(trainable_state_dict(pl_module.net), str(self._path(trainer, "end.safetensors")))


if __name__ == "__main__":
    callbacks_module.build_callbacks = lambda cfg, run_dir: [RankRecorder(run_dir), *BUILD_CALLBACKS(cfg, run_dir)]
    # train.py as `python train.py` runs it, with sys.argv[0] left on this probe (runpy.run_path would point it at
    # train.py): Lightning's launcher starts the other ranks with sys.argv, so they get the recorder too
    exec(compile(TRAIN_PY.read_text(), str(TRAIN_PY), "exec"), {"__name__": "__main__", "__file__": str(TRAIN_PY)})
