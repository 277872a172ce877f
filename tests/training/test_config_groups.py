"""Every option of every config group composes, builds and trains two steps on the tiny backbone.

model/vision and model/audio options: tests/training/test_{vision,audio}_designs_train.py. Options that
need a GPU (trainer=gpu, trainer=fsdp) are composed and their Trainer arguments instantiated here; they
train in bench/gpu_train_check.sh, and FSDP on CPU processes in test_fsdp.py; trainer=ddp in test_ddp.py.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from gemma_fusion.training import recipe
from gemma_fusion.core.config import CONFIG_DIR
from gemma_fusion.training.fsdp import trainer_options

GROUPS = ("backbone", "lora", "data", "optim", "logger", "checkpoint", "distill", "experiment", "trainer")
NEEDS_GPU = {("trainer", "gpu"), ("trainer", "fsdp"), ("trainer", "ddp")}
OPTIONS = [(group, path.stem) for group in GROUPS for path in sorted((Path(CONFIG_DIR) / group).glob("*.yaml"))]


def test_every_group_is_covered():
    covered = {group for group, _ in OPTIONS} | {"model/vision", "model/audio"}
    assert covered == {p.relative_to(CONFIG_DIR).parent.as_posix() for p in Path(CONFIG_DIR).rglob("*/*.yaml")}


@pytest.fixture(scope="module")
def align_run(tmp_path_factory, tiny_gemma4_dir, tiny_demo_dir):
    """A finished first stage for experiment=finetune."""
    from tests.training.conftest import compose_train

    run = tmp_path_factory.mktemp("align")
    recipe.train(compose_train(tiny_gemma4_dir, tiny_demo_dir, "experiment=align", "trainer.max_steps=2",
                                    "eval_after_train=false"), run)
    return run


@pytest.mark.parametrize("group, option", [o for o in OPTIONS if o not in NEEDS_GPU])
def test_option_trains_two_steps(group, option, make_cfg, tiny_gemma4_dir, tmp_path, request, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    extra = []
    if group == "backbone":  # its path and pretraining recipe replaced by the tiny random checkpoint
        extra = [f"backbone.path={tiny_gemma4_dir}", "backbone.pretrain=null"]
    if (group, option) == ("experiment", "finetune"):
        extra = [f"model.init_from={request.getfixturevalue('align_run')}"]
    if (group, option) in (("experiment", "distill"), ("distill", "teacher")):  # the finished run teaches
        extra = [f"distill.teacher={request.getfixturevalue('align_run')}"]
    cfg = make_cfg(f"{group}={option}", *extra, "trainer.max_steps=2", "checkpoint.every_n_steps=1",
                   "eval_after_train=false", "trainer.accelerator=cpu", "trainer.devices=1")
    recipe.train(cfg, tmp_path)
    saved = load_file(tmp_path / "final" / "trainable.safetensors")
    assert saved and (tmp_path / "compute.json").is_file()
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt")) == ["step-0000001.ckpt", "step-0000002.ckpt"]


@pytest.mark.parametrize("option", [o for g, o in NEEDS_GPU])
def test_gpu_trainer_options_compose_and_instantiate(option, make_cfg):
    cfg = make_cfg(f"trainer={option}")
    arguments = trainer_options(cfg.trainer)  # what build_trainer passes to lightning.Trainer
    assert arguments["accelerator"] == "gpu" and arguments["precision"] == "bf16-mixed"
    assert arguments["max_steps"] == 3
