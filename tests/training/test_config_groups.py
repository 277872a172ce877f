"""Every option of every config group composes, builds and trains two steps on the tiny backbone: the weights
that train move, the frozen ones do not.

model/vision and model/audio options: tests/training/test_{vision,audio}_designs_train.py. The trainer options
run on the CPU too: `trainer=gpu` with `trainer.accelerator=cpu` (its bf16-mixed autocast on the CPU; the GPU
itself is exercised by bench/gpu_train_check.sh), `trainer=ddp` and `trainer=fsdp` as two gloo processes through
train.py, FSDP through `tests/training/cpu_fsdp.py` (Lightning's FSDPStrategy with its CUDA-only check lifted:
Lightning itself refuses FSDP on the CPU). Their longer checks: test_ddp.py, test_fsdp.py.
"""
from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gemma_fusion.core.config import CONFIG_DIR
from gemma_fusion.training import recipe
from gemma_fusion.training.fsdp import trainer_options

GROUPS = ("backbone", "lora", "data", "optim", "logger", "checkpoint", "distill", "experiment", "trainer")
TWO_PROCESSES = {("trainer", "fsdp"), ("trainer", "ddp")}
OPTIONS = [(group, path.stem) for group in GROUPS for path in sorted((Path(CONFIG_DIR) / group).glob("*.yaml"))]
ROOT = Path(__file__).resolve().parents[2]


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


@pytest.mark.parametrize("group, option", [o for o in OPTIONS if o not in TWO_PROCESSES])
def test_option_trains_two_steps(group, option, make_cfg, tiny_gemma4_dir, tmp_path, request, monkeypatch,
                                 start_weights):
    monkeypatch.setenv("WANDB_MODE", "offline")
    extra = []
    if group == "backbone":  # its path and pretraining recipe replaced by the tiny random checkpoint
        extra = [f"backbone.path={tiny_gemma4_dir}", "backbone.pretrain=null"]
    if (group, option) == ("experiment", "finetune"):
        extra = [f"model.init_from={request.getfixturevalue('align_run')}"]
    if (group, option) in (("experiment", "distill"), ("distill", "teacher")):  # the finished run teaches
        extra = [f"distill.teacher={request.getfixturevalue('align_run')}"]
    if group == "experiment":  # two steps, not what a preset's compute.budget buys (test_train.py checks matching)
        extra.append("compute.match=none")
    cfg = make_cfg(f"{group}={option}", *extra, "trainer.max_steps=2", "checkpoint.every_n_steps=1",
                   "eval_after_train=false", "trainer.accelerator=cpu", "trainer.devices=1")
    trained = recipe.train(cfg, tmp_path)
    before = start_weights.weights  # this run's own weights when fitting started
    saved = load_file(tmp_path / "final" / "trainable.safetensors")
    trainable = {n for n, p in trained.named_parameters() if p.requires_grad}
    assert saved and set(saved) == trainable and (tmp_path / "compute.json").is_file()
    assert any(not torch.equal(saved[n], before[n]) for n in saved), "two steps moved no trainable weight"
    assert all(torch.equal(p, before[n]) for n, p in trained.named_parameters() if n not in trainable)
    assert all(math.isfinite(loss) for loss in _losses(tmp_path))
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt")) == ["step-0000001.ckpt", "step-0000002.ckpt"]


@pytest.mark.slow  # subprocesses or many steps: `pytest -m slow`, its own step in .ci/run
@pytest.mark.parametrize("option", sorted(o for g, o in TWO_PROCESSES))
def test_multi_process_trainer_trains_two_steps_on_two_cpu_processes(option, tiny_gemma4_dir, even_demo_dir, tmp_path):
    """trainer=ddp / trainer=fsdp with its own settings (bf16-mixed included), on 2 CPU ranks (gloo)."""
    run_dir = tmp_path / "run"
    overrides = [
        f"trainer={option}", "trainer.accelerator=cpu", "trainer.devices=2", f"backbone.path={tiny_gemma4_dir}",
        "~backbone.pretrain", f"data.train={even_demo_dir}/train", f"data.val={even_demo_dir}/val",
        "data.prepare_demo=false", "data.num_workers=0", "data.shuffle_buffer=0", "data.batch_size=2",
        "data.image_tokens=8", "data.cache_gb=0", "trainer.max_steps=2", "trainer.enable_progress_bar=false",
        "optim.warmup_steps=1", "checkpoint.every_n_steps=1", "eval_after_train=false", f"hydra.run.dir={run_dir}",
    ]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "SLURM_NTASKS", "HYDRA_FULL_ERROR")}
    if option == "fsdp":  # Lightning refuses FSDP on the CPU: the test-only subclass lifts that check, nothing else
        overrides.append("trainer.strategy._target_=tests.training.cpu_fsdp.CPUFSDPStrategy")
        env["GEMMA_FUSION_TARGETS"] = "tests"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback" not in out, out[-4000:]
    steps = [torch.load(run_dir / "checkpoints" / f"step-000000{i}.ckpt", weights_only=True)["state_dict"] for i in (1, 2)]
    final = load_file(run_dir / "final" / "trainable.safetensors")
    assert final and {k.removeprefix("net."): v.shape for k, v in steps[1].items()} == {k: v.shape for k, v in final.items()}
    assert any(not torch.equal(steps[0][k], steps[1][k]) for k in steps[0]), "step 2 moved no trainable weight"
    assert all(torch.equal(final[k.removeprefix("net.")], v) for k, v in steps[1].items())
    assert all(math.isfinite(loss) for loss in _losses(run_dir))


@pytest.mark.parametrize("option", ["gpu", "ddp", "fsdp"])
def test_gpu_trainer_options_ask_for_the_gpu_in_bf16(option, make_cfg):
    arguments = trainer_options(make_cfg(f"trainer={option}").trainer)  # what build_trainer passes to lightning.Trainer
    assert arguments["accelerator"] == "gpu" and arguments["precision"] == "bf16-mixed"
    assert arguments["max_steps"] == 3


def _losses(run_dir: Path) -> list[float]:
    with (run_dir / "metrics.csv").open(newline="") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(losses) == 2
    return losses
