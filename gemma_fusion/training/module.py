"""A thin LightningModule around FusionModel: the step, the optimiser, throughput metrics, trainable-only checkpoints."""
from __future__ import annotations

import time
import warnings

import lightning as L
import torch

from gemma_fusion.models.fusion import FusionModel
from gemma_fusion.training.optim import build_optimizer


# The frozen backbone is in eval mode on purpose (dropout off); Lightning warns about it at every fit.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", module="lightning")


class FusionLitModule(L.LightningModule):
    """Wraps `net` (a FusionModel); everything model-specific stays in the model."""

    def __init__(self, net: FusionModel, lr: dict, weight_decay: float = 0.0, betas=(0.9, 0.999),
                 warmup_steps: int = 0, total_steps: int = 1000):
        super().__init__()
        self.net = net
        self.optim_args = dict(lr=dict(lr), weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps,
                               total_steps=total_steps)
        self.strict_loading = False  # checkpoints hold only the trainable parameters
        self._t_last = None

    def forward(self, batch: dict):
        return self.net(**{k: v for k, v in batch.items() if k != "meta"})

    def training_step(self, batch: dict, batch_idx: int):
        out = self(batch)
        batch_size = batch["input_ids"].shape[0]
        self.log("train/loss", out.loss, on_step=True, prog_bar=True, batch_size=batch_size)
        self.log("train/targets", float(out.num_targets), on_step=True, batch_size=batch_size)
        now = time.perf_counter()
        if self._t_last is not None:
            dt = now - self._t_last
            tokens = float(batch["attention_mask"].sum())
            self.log("train/tokens_per_s", tokens / dt, on_step=True, batch_size=batch_size)
            self.log("train/samples_per_s", batch_size / dt, on_step=True, batch_size=batch_size)
        self._t_last = now
        for group in self.optimizers().optimizer.param_groups:
            self.log(f"lr/{group['name']}", group["lr"], on_step=True, batch_size=batch_size)
        return out.loss

    def configure_optimizers(self):
        optimizer, scheduler = build_optimizer(self.net, **self.optim_args)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = {f"net.{n}" for n, p in self.net.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
