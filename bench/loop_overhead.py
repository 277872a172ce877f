"""What train.py's machinery costs on top of the arithmetic: the demo's own model, batches and optimiser, stepped
through the real recipe (Lightning, callbacks, loggers, progress bar) and through a bare torch loop, in one run.

    python bench/loop_overhead.py [--steps 150] [--warmup 20] [key=value ...]

The demo configuration (`python train.py`'s defaults; `key=value` overrides as train.py takes them) is set up by
`gemma_fusion.training.recipe.setup` on the prepared demo data and tiny backbone (made first if missing, as
train.py would). `--steps` batches are drawn from the run's training loader once, then stepped:

- bare: for each batch, forward, backward, gradient clipping, AdamW step, scheduler step, zero_grad -- the
  recipe's arithmetic and nothing else;
- lightning: the same batches through `trainer.fit` of the recipe's module and trainer (every per-step metric,
  the CSV logger's per-step flush, data bookkeeping, the progress bar);
- loader: the seconds the run's own loader takes to deliver a batch, read from the recipe's loader (the first
  batches of a run, decoded; later epochs come from the RAM cache when data.cache_gb allows).

bare and lightning alternate `--passes` times (bare, lightning, bare, lightning, ...) from the same starting weights,
so drifting load on shared cores hits both alike; the figure is the median seconds per step after `--warmup`
steps of each pass. Prints one JSON line: ms per step of each, `overhead_ratio` = lightning / bare (target
<= 1.10), `loader_ms_per_batch`, and `max_loss_diff`, the largest difference between the two loops' per-step
losses: both compute the same steps, so it is ~0 (a check that the bare loop is the recipe's arithmetic).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback

from gemma_fusion.artifacts.rundir import environment
from gemma_fusion.core.batch import model_inputs
from gemma_fusion.core.config import CONFIG_DIR
from gemma_fusion.training import recipe
from gemma_fusion.training.optim import build_optimizer


class StepClock(Callback):
    """Wall-clock seconds between consecutive training batch ends, and each step's loss."""

    def __init__(self):
        self.ends: list[float] = []
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())
        self.losses.append(float(outputs["loss"]))


class Replay(torch.utils.data.IterableDataset):
    """The pre-drawn batches, as a loader Lightning accepts (a plain list of batches reads as a list of loaders)."""

    def __init__(self, batches: list[dict]):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def bare_pass(net, batches, optim_args, clip: float | None) -> tuple[list[float], list[float]]:
    """Seconds per step of a plain loop over `batches` (the recipe's optimiser, schedule and gradient clipping), and
    each step's loss."""
    optimizer, scheduler = build_optimizer(net, **optim_args)
    trainable = [p for p in net.parameters() if p.requires_grad]
    net.train()
    ends, losses = [time.perf_counter()], []
    for batch in batches:
        loss = net(**model_inputs(batch)).loss
        losses.append(loss.item())
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(trainable, clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ends.append(time.perf_counter())
    return [b - a for a, b in zip(ends, ends[1:])], losses


def lightning_pass(cfg, run_dir: Path, batches) -> tuple[list[float], list[float]]:
    """Seconds per step of the recipe's own trainer and module over `batches`, and each step's loss."""
    clock = StepClock()
    original = recipe.callbacks.build_callbacks
    recipe.callbacks.build_callbacks = lambda c, r: [*original(c, r), clock]
    try:
        job = recipe.setup(cfg, run_dir)
    finally:
        recipe.callbacks.build_callbacks = original
    start = time.perf_counter()
    job.trainer.fit(job.module, train_dataloaders=torch.utils.data.DataLoader(Replay(batches), batch_size=None))
    ends = [start, *clock.ends]
    return [b - a for a, b in zip(ends, ends[1:])], clock.losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="train.py key=value overrides")
    args = parser.parse_args()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"trainer.max_steps={args.steps}", "eval_after_train=false",
                                          *args.overrides])
    with tempfile.TemporaryDirectory() as tmp:
        job = recipe.setup(copy.deepcopy(cfg), Path(tmp) / "setup")
        loader_start = time.perf_counter()
        batches = list(itertools.islice(iter(job.train_loader), args.steps))
        loader_s = (time.perf_counter() - loader_start) / len(batches)
        start = copy.deepcopy(job.model.state_dict())
        optim = cfg.optim
        optim_args = dict(lr=dict(optim.lr), weight_decay=optim.weight_decay, betas=optim.betas,
                          warmup_steps=optim.warmup_steps, total_steps=cfg.trainer.max_steps)
        times, loss_diff = {"bare": [], "lightning": []}, 0.0
        for i in range(args.passes):
            print(f"pass {i + 1}/{args.passes}", file=sys.stderr)
            job.model.load_state_dict(start)
            bare, bare_losses = bare_pass(job.model, batches, optim_args, cfg.trainer.gradient_clip_val)
            lightning, lightning_losses = lightning_pass(copy.deepcopy(cfg), Path(tmp) / f"run{i}", batches)
            times["bare"] += bare[args.warmup:]
            times["lightning"] += lightning[args.warmup:]
            loss_diff = max(loss_diff, *(abs(a - b) for a, b in zip(bare_losses, lightning_losses, strict=True)))
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    print(json.dumps({
        "bench": "loop_overhead", "steps": args.steps, "warmup": args.warmup, "passes": args.passes,
        "overrides": args.overrides, "batch_size": cfg.data.batch_size,
        "bare_ms_per_step": round(ms["bare"], 2), "lightning_ms_per_step": round(ms["lightning"], 2),
        "overhead_ratio": round(ms["lightning"] / ms["bare"], 3), "target_overhead_ratio": 1.10,
        "loader_ms_per_batch": round(1000 * loader_s, 2), "max_loss_diff": loss_diff, "threads": torch.get_num_threads(),
        "environment": environment(), "date": datetime.date.today().isoformat(),
    }))


if __name__ == "__main__":
    main()
