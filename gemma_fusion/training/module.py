"""A thin LightningModule around FusionModel: the step, the optimiser, throughput metrics, trainable-only checkpoints."""
from __future__ import annotations

import time
import warnings

import lightning as L
from lightning.pytorch.strategies import FSDPStrategy
import torch

from gemma_fusion.core.batch import model_inputs
from gemma_fusion.core.errors import UserError
from gemma_fusion.models.fusion import FusionModel
from gemma_fusion.training.checkpointing import rng_state, set_rng_state
from gemma_fusion.training.optim import build_optimizer
from gemma_fusion.training.throughput import StepFlops, device_peak_tflops, peak_memory_bytes
from gemma_fusion.models.trainable import trainable_names


# The frozen backbone is in eval mode on purpose (dropout off); Lightning warns about it at every fit.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", module="lightning")


class FusionLitModule(L.LightningModule):
    """Wraps `net` (a FusionModel); everything model-specific stays in the model."""

    def __init__(self, net: FusionModel, lr: dict, weight_decay: float = 0.0, betas=(0.9, 0.999),
                 warmup_steps: int = 0, total_steps: int = 1000, max_nonfinite_skips: int = 0,
                 peak_tflops: float | None = None, distiller=None):
        super().__init__()
        self.net = net
        self.distiller = distiller  # training/distill.py: the teacher's side of a distillation loss, or None
        self.optim_args = dict(lr=dict(lr), weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps,
                               total_steps=total_steps)
        self.strict_loading = False  # checkpoints hold only the trainable parameters
        self.max_nonfinite_skips, self.nonfinite_skips = max_nonfinite_skips, 0
        self._t_last = None
        self._step_metrics: dict[str, float | torch.Tensor] = {}  # this step's row of RUN/metrics.csv, see log_step
        self.step_flops = StepFlops(net.backbone.text_config, net.backbone.decoder)
        self.peak_tflops = peak_tflops  # None: the device's own (known NVIDIA cards), else no MFU
        self._with_grad, self._grad_norm = [], None  # this step's parameters with a gradient and its norm, to clip
        self._trainable: list[torch.nn.Parameter] | None = None  # found once, after the strategy has set the model up

    def _nonfinite(self, what: str) -> None:
        """A non-finite loss or gradient: skip the step (counted) while the budget lasts, else stop."""
        self.nonfinite_skips += 1
        if self.nonfinite_skips > self.max_nonfinite_skips:
            raise UserError(f"Non-finite {what} at step {self.global_step} (skips allowed: "
                            f"optim.max_nonfinite_skips={self.max_nonfinite_skips}); lower the learning rate, check "
                            "the data with `python -m gemma_fusion.data.inspect`, or allow skips.")
        self.log_step({"train/nonfinite_skips": float(self.nonfinite_skips)})

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        """The batch's tensors to `device`; the loader's bookkeeping (`meta`: one record per sample, `stats`,
        `position`: no tensors) stays as it is. Lightning's default walks every record, ~2 ms a step."""
        if not isinstance(batch, dict):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}

    def forward(self, batch: dict):
        return self.net(**model_inputs(batch))

    def training_step(self, batch: dict, batch_idx: int):
        out = self(batch)
        batch_size = batch["input_ids"].shape[0]
        if self.distiller is not None:
            targets = batch["labels"][:, 1:]
            parts = self.distiller.loss(out.logits, targets[targets != -100], batch)
            self.log_step({"train/ce": parts["ce"], "train/kl": parts["kl"]})
            out.loss = parts["loss"]
        if not torch.isfinite(out.loss):
            self._nonfinite("loss")
            return None  # Lightning skips backward and the optimizer step
        self.log("train/loss", out.loss, on_step=True, prog_bar=True, logger=False, batch_size=batch_size)  # the bar
        metrics = {"train/loss": out.loss.detach(), "train/targets": float(out.num_targets)}
        now = time.perf_counter()
        if self._t_last is not None:
            dt = now - self._t_last
            metrics["train/tokens_per_s"] = float(batch["attention_mask"].sum()) / dt
            metrics["train/samples_per_s"] = batch_size / dt
            tflops = self.step_flops(batch, int(out.num_targets)) / dt / 1e12
            metrics["train/model_tflops_per_s"] = tflops
            peak = device_peak_tflops(self.device, self.peak_tflops)
            if peak:
                metrics["train/mfu"] = tflops / peak
        metrics["train/peak_mem_gb"] = peak_memory_bytes(self.device) / 1e9
        self._t_last = now
        metrics.update({f"lr/{group['name']}": group["lr"] for group in self.optimizers().optimizer.param_groups})
        self.log_step(metrics)
        return out.loss

    def log_step(self, metrics: dict) -> None:
        """Add to this step's row of the loggers (RUN/metrics.csv, W&B), written once at the end of the step.

        Lightning's `self.log` costs about 1 ms per metric on a CPU (it files each value in its result collection,
        for epoch aggregation and syncing that per-step metrics do not use); a step logs some fifteen, 10 % of a
        demo step (bench/loop_overhead.py). The row goes through Lightning's own logger connector: the same step
        numbering, `epoch` column and `trainer.log_every_n_steps` as `self.log`.
        """
        self._step_metrics.update(metrics)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        metrics, self._step_metrics = self._step_metrics, {}
        connector = self.trainer._logger_connector
        if metrics and connector.should_update_logs:
            connector.log_metrics(metrics)

    def on_before_optimizer_step(self, optimizer) -> None:
        """The gradient norm of this step: logged, checked for inf/NaN, and reused by the clipping below."""
        if self._trainable is None:  # walking the whole model's parameters costs ~2 ms: once, not every step
            self._trainable = [p for p in self.net.parameters() if p.requires_grad]
        self._with_grad = [p for p in self._trainable if p.grad is not None]
        grads = [p.grad for p in self._with_grad]
        if self._sharded():  # each rank holds a shard of every gradient: the norm is over all of them
            square = sum((g.float().pow(2).sum() for g in grads), torch.zeros((), device=self.device))
            torch.distributed.all_reduce(square)
            norm = square.sqrt()
        else:
            norm = torch.nn.utils.get_total_norm(grads, 2.0)
        self._grad_norm = norm
        if not torch.isfinite(norm):
            self._nonfinite("gradient")
            for p in self._with_grad:
                p.grad = None  # AdamW leaves parameters without a gradient untouched: the step is a no-op
            self._with_grad = []
            return
        self.log_step({"train/grad_norm": norm})

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip by the norm `on_before_optimizer_step` computed (Lightning's own clipping computes it a second time:
        about 5 % of a demo step); the same arithmetic as `torch.nn.utils.clip_grad_norm_`."""
        if not gradient_clip_val or gradient_clip_algorithm not in (None, "norm") or self._sharded():
            return self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if self._with_grad:
            torch.nn.utils.clip_grads_with_norm_(self._with_grad, gradient_clip_val, self._grad_norm)

    def _sharded(self) -> bool:
        return self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy) \
            and torch.distributed.is_initialized()

    def configure_optimizers(self):
        optimizer, scheduler = build_optimizer(self.net, **self.optim_args)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = {f"net.{n}" for n in trainable_names(self.net)}  # names as the state dict has them, also under FSDP
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["rng"] = rng_state()
        checkpoint["nonfinite_skips"] = self.nonfinite_skips

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "rng" in checkpoint:
            set_rng_state(checkpoint["rng"])
        self.nonfinite_skips = checkpoint.get("nonfinite_skips", 0)
