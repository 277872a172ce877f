"""Train projectors (+ LoRA) on a frozen backbone: `python train.py [overrides]` (see configs/train.yaml)."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from gemma_fusion.core.config import (CONFIG_DIR, check_cli_overrides, check_targets, check_values, checked_instantiate,
                                 save_yaml, to_plain)
from gemma_fusion.core.errors import UserError, exit_on_user_error

log = logging.getLogger(__name__)


def prepare(cfg: DictConfig) -> None:
    """First-run preparation: the demo data and the project's tiny backbone, each made once and cached."""
    if cfg.data.get("prepare_demo"):
        from gemma_fusion.data.demo import ensure_demo_data

        data = to_plain(cfg.data)
        ensure_demo_data(Path(data["train"]).parent, data["demo_train_per_task"], data["demo_val_per_task"])
    if cfg.backbone.get("pretrain"):
        from gemma_fusion.training.pretrain_text import PretrainConfig, ensure_pretrained

        ensure_pretrained(cfg.backbone.path, PretrainConfig(**to_plain(cfg.backbone.pretrain)))


def train(cfg: DictConfig, run_dir: Path):
    """Prepare, build, train and save into `run_dir`; returns the trained FusionModel."""
    from gemma_fusion.data.pipeline import make_loader, run_preprocessor
    from gemma_fusion.data.state import StreamState
    from gemma_fusion.models.build import build_model
    from gemma_fusion.training.callbacks import (DataBookkeeping, build_callbacks, gathered_trainable,
                                                 save_final, set_aside_metrics, stitch_metrics)
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from gemma_fusion.training.compute import compute_report, flat_metrics, matched_steps, write_compute_report
    from gemma_fusion.training.checkpointing import SignalCheckpoint
    from gemma_fusion.training.module import FusionLitModule

    from omegaconf import OmegaConf

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:  # e.g. experiment=finetune without model.init_from, data=shards without data.train
        raise UserError(f"{', '.join(missing)} must be set (e.g. {missing[0]}=...): the chosen options leave "
                        f"{'it' if len(missing) == 1 else 'them'} open.")
    check_targets(cfg)  # before anything is imported or built from them
    check_values(cfg)
    if cfg.model.get("require_init_from") and not cfg.model.get("init_from"):
        raise UserError("this experiment continues an earlier run: pass model.init_from=RUN (e.g. experiment=finetune "
                        "model.init_from=runs/align).")
    distiller = build_distiller(cfg)  # bad distill settings stop here, before anything is built
    ckpt_path = resume_path(cfg, run_dir)  # (a resume= that is not a checkpoint too)
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:  # (read from RANK / LOCAL_RANK / SLURM_PROCID): one process writes RUN's files
        save_yaml(cfg, run_dir / "config.yaml")
    L.seed_everything(cfg.seed, workers=True)
    prepare(cfg)
    check_data_paths(cfg.data)  # before the (possibly long) model load
    model = build_model(cfg)
    data = cfg.data
    preprocess = run_preprocessor(model, data)
    state = StreamState()
    train_loader = make_loader(
        to_plain(data.train), preprocess, data.batch_size, data.num_workers, data.shuffle_buffer, cfg.seed,
        resampled=data.get("resampled", True), bucket_batches=data.get("bucket_batches", 1),
        cache_gb=data.get("cache_gb", 0), pack_length=data.get("pack_length", 0),
        max_batch_tokens=data.get("max_batch_tokens"), state=state, allow_pipe=data.get("allow_pipe", False),
        world_size=planned_world_size(cfg.trainer), max_shards=data.get("max_train_shards"),
        max_bad_fraction=data.get("max_bad_fraction", 0.05), bad_check_after=data.get("bad_check_after", 200),
    )
    # every rank measures all of val (the same samples, so the same figures and the same matched step count)
    report = compute_report(model, make_loader(to_plain(data.val), preprocess, data.eval_batch_size,
                                               split_by_rank=False), design_choices(cfg))
    steps = matched_steps(report, cfg.compute.match, cfg.compute.budget, data.batch_size)
    if steps is not None:
        cfg.trainer.max_steps = steps
    if rank_zero_only.rank == 0:
        write_compute_report(run_dir, report)
        if steps is not None:
            save_yaml(cfg, run_dir / "config.yaml")  # with the matched trainer.max_steps
    module = FusionLitModule(model, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=cfg.optim.betas,
                             warmup_steps=cfg.optim.warmup_steps,
                             total_steps=cfg.optim.get("schedule_steps") or cfg.trainer.max_steps,
                             max_nonfinite_skips=cfg.optim.get("max_nonfinite_skips", 0),
                             peak_tflops=cfg.logger.get("peak_tflops"), distiller=distiller)
    callbacks = [DataBookkeeping(state, data.get("max_bad_fraction", 0.05), data.get("bad_check_after", 200)),
                 SignalCheckpoint(run_dir / "checkpoints"), *build_callbacks(cfg, run_dir)]
    if ckpt_path and rank_zero_only.rank == 0:
        set_aside_metrics(run_dir)
    trainer = build_trainer(cfg, run_dir, callbacks)
    # FSDP gathers each unit's weights with a collective every rank must join, and DDP expects a gradient for every
    # trainable parameter (also with `trainer.devices=N` alone): all ranks run every projector
    model.run_idle_projectors = isinstance(trainer.strategy, (FSDPStrategy, DDPStrategy))
    if module.distiller is not None:  # the teacher (or its cached top-k) on this process's device
        module.distiller.setup(trainer.strategy.root_device, to_plain(data.train), data.eval_batch_size,
                               data.get("allow_pipe", False))
    if rank_zero_only.rank == 0:
        for logger in trainer.loggers:
            logger.log_hyperparams(flat_metrics(report))
    try:
        trainer.fit(module, train_dataloaders=train_loader, ckpt_path=ckpt_path)
    except SIGTERMException:  # Lightning's own SIGTERM handling; SignalCheckpoint saved in on_exception
        pass
    if trainer.is_global_zero:
        stitch_metrics(run_dir)
    if getattr(trainer, "stopped_by_signal", False):
        print(f"stopped by a signal at step {trainer.global_step}: checkpoint written to {run_dir / 'checkpoints'}; "
              "continue with resume=auto")
        raise SystemExit(0)
    save_final(model, run_dir, gathered_trainable(trainer, model))  # FSDP: gathered from the shards onto rank 0
    if isinstance(trainer.strategy, FSDPStrategy):  # the live model is sharded: rank 0 continues with a whole copy
        trainer.strategy.barrier()
        if rank_zero_only.rank != 0:
            return model
        from gemma_fusion.artifacts.load import load_run

        model = load_run(run_dir)[0].to(trainer.strategy.root_device)
    if cfg.lora.get("r") and rank_zero_only.rank == 0:  # the adapters again, in peft's own format
        from gemma_fusion.models.lora import save_peft_adapter

        save_peft_adapter(model, run_dir / "final" / "adapter", cfg.backbone.path, lora_config=cfg.lora)
    if cfg.lora.get("merge"):  # fold the adapters into the backbone: same logits, no adapter cost in evaluation
        from gemma_fusion.models.lora import merge_lora

        merge_lora(model)
    return model


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: list) -> L.Trainer:
    """The Lightning Trainer of `cfg.trainer` (a strategy may be a `_target_` node); a setting Lightning rejects
    (`trainer.precision=fp8`, `trainer.accelerator=gpu` without one) is one sentence."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from gemma_fusion.training.callbacks import build_loggers
    from gemma_fusion.training.checkpointing import AtomicCheckpointIO, slurm_environment

    options = checked_instantiate(cfg.trainer, "trainer", _convert_="all")
    try:
        return L.Trainer(**options, default_root_dir=run_dir, logger=build_loggers(cfg, run_dir), callbacks=callbacks,
                         enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                         plugins=[p for p in (AtomicCheckpointIO(), slurm_environment()) if p is not None])
    except (MisconfigurationException, ValueError, TypeError) as err:
        raise UserError(f"trainer: Lightning rejects these settings ({err}); check the trainer.* values.") from err


def check_data_paths(data: DictConfig) -> None:
    """data.train and data.val name shards that exist (one sentence naming the pattern and what is there)."""
    from gemma_fusion.data.sources import mixture_components, resolve_shards

    for split in ("train", "val"):
        try:
            for spec, _ in mixture_components(to_plain(data[split])):
                resolve_shards(spec, data.get("allow_pipe", False))
        except UserError as err:
            raise UserError(f"data.{split}: {err}") from err


def build_distiller(cfg: DictConfig):
    """The distillation loss's teacher side when `distill.teacher` is set (configs/distill/), else None."""
    node = cfg.get("distill") or {}
    if not node.get("teacher"):
        return None
    from gemma_fusion.training.distill import Distiller

    return Distiller(str(node.teacher), node.get("alpha", 0.5), node.get("temperature", 2.0), node.get("top_k", 0),
                     node.get("cache"))


def design_choices(cfg: DictConfig) -> dict:
    """The design of each part, by config option name (`model/vision=…`) when Hydra composed the run."""
    try:
        choices = HydraConfig.get().runtime.choices
    except ValueError:  # composed outside a Hydra app (tests): the projector classes
        choices = {}
    names = {group: choices.get(f"model/{group}") or (cfg.model.get(group) or {}).get("_target_", "none")
             for group in ("vision", "audio")}
    return {**names, "lora": choices.get("lora") or f"r={cfg.lora.get('r') or 0}", "backbone": str(cfg.backbone.path),
            "quant": cfg.backbone.get("quant") or "none"}


def planned_world_size(trainer_cfg) -> int:
    """devices x num_nodes when both are numbers (for the too-few-shards warning); 1 when unknown ('auto')."""
    try:
        return max(1, int(trainer_cfg.get("devices", 1))) * max(1, int(trainer_cfg.get("num_nodes", 1)))
    except (TypeError, ValueError):
        return 1


def resume_path(cfg: DictConfig, run_dir: Path) -> str | None:
    """`resume=auto` (or `true`): the newest checkpoint under RUN/checkpoints, if any; `resume=PATH`: that file."""
    choice = cfg.get("resume")
    if not choice:
        return None
    if choice is True or choice == "auto":
        for partial in (run_dir / "checkpoints").glob("*.ckpt.tmp"):  # a save cut short by a kill
            log.warning("removing %s: a checkpoint save that did not finish", partial)
            partial.unlink(missing_ok=True)
        found = sorted((run_dir / "checkpoints").glob("*.ckpt"))
        return str(found[-1]) if found else None
    if not Path(choice).is_file():
        raise UserError(f"resume={choice} is not a checkpoint file; pass resume=auto or a .ckpt path from RUN/checkpoints.")
    return str(choice)


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """train(), then greedy-generation evaluation on data.val -> RUN/eval.json (if eval_after_train).

    With several processes every rank trains; global rank 0 alone evaluates, on all of data.val.
    """
    from gemma_fusion.eval.evaluate import evaluate_into

    model = train(cfg, run_dir)
    if rank_zero_only.rank != 0 or not cfg.eval_after_train:
        return {}
    return evaluate_into(run_dir, model, cfg.data)  # reads all of val, not rank 0's share


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    # torchrun and srun start all ranks at once, each resolving its own runs/${now:...}; Lightning's own
    # launcher (python train.py trainer=ddp) hands rank 0's directory to the ranks it starts.
    ranks = int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)
    if ranks > 1 and not any(o.startswith("hydra.run.dir=") for o in hydra_cfg.overrides.hydra):
        sys.exit("error: with several processes pass hydra.run.dir=RUN (e.g. runs/$SLURM_JOB_ID) so that every "
                 "rank uses the same run directory; resume=auto looks for checkpoints there.")
    exit_on_user_error(run, cfg, Path(hydra_cfg.runtime.output_dir))


if __name__ == "__main__":
    check_cli_overrides("train", sys.argv[1:])
    main()
