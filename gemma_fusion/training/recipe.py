"""The training recipe behind `python train.py`: setup -> fit -> finalize (-> evaluation).

    setup(cfg, run_dir)   every model-free check (training/startup.py), the run's config (`RunDir.config`), the demo data and tiny
                          backbone (made once, cached), the model, the loaders, compute matching, the Trainer
    fit(job)              trainer.fit (resume, SIGTERM/SIGUSR1: checkpoint and exit 0), metrics stitched
    finalize(job)         the final weights, the peft adapter, the merge; returns the trained FusionModel
    run(cfg, run_dir)     all three, then greedy-generation evaluation on data.val -> `RunDir.eval`

With several processes every rank runs the recipe; global rank 0 alone writes RUN's files and evaluates.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from gemma_fusion.artifacts.load import init_from_run, load_run
from gemma_fusion.artifacts.rundir import RunDir, environment
from gemma_fusion.core.config import to_plain
from gemma_fusion.data.demo import ensure_demo_data
from gemma_fusion.data.pipeline import make_loader, run_preprocessor
from gemma_fusion.data.state import StreamState
from gemma_fusion.eval.evaluate import evaluate_into
from gemma_fusion.models.build import build_model
from gemma_fusion.models.fusion import FusionModel
from gemma_fusion.models.lora import merge_lora, save_peft_adapter
from gemma_fusion.training import callbacks
from gemma_fusion.training.checkpointing import SignalCheckpoint
from gemma_fusion.training.compute import compute_report, flat_metrics, matched_steps, write_compute_report
from gemma_fusion.training.module import FusionLitModule
from gemma_fusion.training.pretrain_text import PretrainConfig, ensure_pretrained
from gemma_fusion.training.startup import check_data_paths, check_startup
from gemma_fusion.training.trainer import build_trainer, is_sharded, planned_world_size, runs_idle_projectors


@dataclass
class Job:
    """What setup() made and fit() / finalize() use."""

    cfg: DictConfig
    run: RunDir
    model: FusionModel
    module: FusionLitModule
    trainer: L.Trainer
    train_loader: object   # the training DataLoader (endless with data.resampled)
    ckpt_path: str | None  # the checkpoint a resumed run continues from


def prepare(cfg: DictConfig) -> None:
    """First-run preparation: the demo data and the project's tiny backbone, each made once and cached."""
    if cfg.data.get("prepare_demo"):
        data = to_plain(cfg.data)
        ensure_demo_data(Path(data["train"]).parent, data["demo_train_per_task"], data["demo_val_per_task"],
                         test_per_task=data["demo_test_per_task"])
    if cfg.backbone.get("pretrain"):
        ensure_pretrained(cfg.backbone.path, PretrainConfig(**to_plain(cfg.backbone.pretrain)))


def loaders(cfg: DictConfig, preprocess, state: StreamState) -> tuple:
    """(training loader, validation loader) of `cfg.data`. Every rank reads all of val (the same samples, so the
    same compute figures and the same matched step count)."""
    train = make_loader(cfg.data, preprocess, train=True, seed=cfg.seed, state=state,
                        world_size=planned_world_size(cfg.trainer))
    val = make_loader(cfg.data, preprocess, train=False, split_by_rank=False)
    return train, val


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


def setup(cfg: DictConfig, run_dir: Path) -> Job:
    """Check, prepare and build everything of a run in `run_dir`; a mistake stops before anything is prepared."""
    checked = check_startup(cfg, run_dir)
    run = RunDir(run_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:  # (read from RANK / LOCAL_RANK / SLURM_PROCID): one process writes RUN's files
        run.save_config(cfg)
        run.write_environment(environment())
    L.seed_everything(cfg.seed, workers=True)
    prepare(cfg)
    if cfg.data.get("prepare_demo"):
        check_data_paths(cfg.data)  # the generated demo, before the (possibly long) model load
    model = build_model(cfg)
    if cfg.model.get("init_from"):  # a training stage: start from an earlier run's trained weights
        init_from_run(model, cfg.model.init_from)
    state = StreamState()
    train_loader, val_loader = loaders(cfg, run_preprocessor(model, cfg.data), state)
    report = compute_report(model, val_loader, design_choices(cfg))
    steps = matched_steps(report, cfg.compute.match, cfg.compute.budget, cfg.data.batch_size)
    if steps is not None:
        cfg.trainer.max_steps = steps
    if rank_zero_only.rank == 0:
        write_compute_report(run.root, report)
        if steps is not None:
            run.save_config(cfg)  # with the matched trainer.max_steps
    optim = cfg.optim
    module = FusionLitModule(model, lr=optim.lr, weight_decay=optim.weight_decay, betas=optim.betas,
                             warmup_steps=optim.warmup_steps,
                             total_steps=optim.get("schedule_steps") or cfg.trainer.max_steps,
                             max_nonfinite_skips=optim.get("max_nonfinite_skips", 0),
                             peak_tflops=cfg.logger.get("peak_tflops"), distiller=checked.distiller)
    bad = cfg.data.max_bad_fraction, cfg.data.bad_check_after
    # callbacks.build_callbacks is looked up at call time: tests and ddp_probe.py add a recording callback there
    extra = [callbacks.DataBookkeeping(state, *bad), SignalCheckpoint(run.checkpoints),
             *callbacks.build_callbacks(cfg, run.root)]
    if checked.ckpt_path and rank_zero_only.rank == 0:
        callbacks.set_aside_metrics(run.root)
    trainer = build_trainer(cfg, run.root, extra)
    model.run_idle_projectors = runs_idle_projectors(trainer.strategy)
    if module.distiller is not None:  # the teacher (or its cached top-k) on this process's device
        module.distiller.setup(trainer.strategy.root_device, to_plain(cfg.data.train), cfg.data.eval_batch_size,
                               cfg.data.allow_pipe)
    if rank_zero_only.rank == 0:
        for logger in trainer.loggers:
            logger.log_hyperparams(flat_metrics(report))
    return Job(cfg, run, model, module, trainer, train_loader, checked.ckpt_path)


def fit(job: Job) -> None:
    """Train (continuing from `job.ckpt_path`); a run stopped by SIGTERM/SIGUSR1 saved a checkpoint and exits 0."""
    trainer = job.trainer
    try:
        trainer.fit(job.module, train_dataloaders=job.train_loader, ckpt_path=job.ckpt_path)
    except SIGTERMException:  # Lightning's own SIGTERM handling; SignalCheckpoint saved in on_exception
        pass
    if trainer.is_global_zero:
        callbacks.stitch_metrics(job.run.root)
    if getattr(trainer, "stopped_by_signal", False):
        print(f"stopped by a signal at step {trainer.global_step}: checkpoint written to {job.run.checkpoints}; "
              "continue with resume=auto")
        raise SystemExit(0)


def finalize(job: Job) -> FusionModel:
    """Save the final weights (and with LoRA the peft adapter), merge the adapters when `lora.merge`; returns the
    model to evaluate (under FSDP rank 0 gets a whole copy, the other ranks their shard)."""
    cfg, trainer, run, model = job.cfg, job.trainer, job.run, job.model
    callbacks.save_final(model, run.root, callbacks.gathered_trainable(trainer, model))  # FSDP: gathered on rank 0
    if is_sharded(trainer.strategy):  # rank 0 continues with a whole copy
        trainer.strategy.barrier()
        if rank_zero_only.rank != 0:
            return model
        model = load_run(run.root)[0].to(trainer.strategy.root_device)
    if cfg.lora.get("r") and rank_zero_only.rank == 0:  # the adapters again, in peft's own format
        save_peft_adapter(model, run.adapter, cfg.backbone.path, lora_config=cfg.lora)
    if cfg.lora.get("merge"):  # fold the adapters into the backbone: same logits, no adapter cost in evaluation
        merge_lora(model)
    return model


def train(cfg: DictConfig, run_dir: Path) -> FusionModel:
    """setup, fit and finalize into `run_dir` (no evaluation); returns the trained FusionModel."""
    job = setup(cfg, run_dir)
    fit(job)
    return finalize(job)


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """train(), then greedy-generation evaluation on all of data.val -> `RunDir.eval` (with eval_after_train), by
    global rank 0 alone; returns the evaluation ({} when none ran)."""
    model = train(cfg, run_dir)
    if rank_zero_only.rank != 0 or not cfg.eval_after_train:
        return {}
    return evaluate_into(run_dir, model, cfg.data)
