"""FSDP with 2 CPU processes (gloo): a bf16 frozen backbone sharded next to fp32 projectors and adapters.

Runs train.py with `trainer=fsdp` through Lightning's launcher and FSDPStrategy (tests/training/cpu_fsdp.py
only lets it run on CPU). One batch holds one modality, so the two ranks run different projectors in a
step unless idle ones run too: FSDP's per-module collectives would then mismatch and the run would hang.

The run keeps the option's own `bf16-mixed`: on the CPU Lightning's FSDP autocast (CUDA only) changes nothing, so
the backbone computes in bf16 as it is stored. `trainer.precision=32-true` would not test that: Lightning's FSDP
precision plugin casts the whole model to float32 for a "-true" precision before sharding.
"""
from __future__ import annotations

import csv
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from gemma_fusion.core.batch import model_inputs
from gemma_fusion.data.pipeline import make_loader, run_preprocessor
from gemma_fusion.models.build import build_model
from gemma_fusion.training.optim import build_optimizer
from tests.training.conftest import compose_train

ROOT = Path(__file__).resolve().parents[2]


def _fsdp_run(run_dir: Path, backbone: Path, demo: Path, *extra: str) -> subprocess.CompletedProcess:
    overrides = [
        "trainer=fsdp", "trainer.strategy._target_=tests.training.cpu_fsdp.CPUFSDPStrategy",
        "trainer.accelerator=cpu", "trainer.devices=2", "backbone.dtype=bfloat16",
        f"backbone.path={backbone}", "~backbone.pretrain", f"data.train={demo}/train", f"data.val={demo}/val",
        "data.prepare_demo=false", "data.resampled=false", "data.num_workers=0", "data.shuffle_buffer=0",
        "data.batch_size=2", "data.eval_batch_size=4", "data.image_tokens=8", "data.cache_gb=0",
        "trainer.enable_progress_bar=false", "optim.warmup_steps=1", "checkpoint.every_n_steps=2",
        "resume=auto", f"hydra.run.dir={run_dir}", *extra,
    ]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "SLURM_NTASKS", "HYDRA_FULL_ERROR")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["GEMMA_FUSION_TARGETS"] = "tests"  # the CPU strategy lives in this test package (config._target_ allowlist)
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides], cwd=run_dir.parent, env=env,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback" not in out, out[-4000:]
    return proc


def _losses(run_dir: Path) -> dict[int, float]:
    with (run_dir / "metrics.csv").open(newline="") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


@pytest.mark.slow  # subprocesses or many steps: `pytest -m slow`, its own step in .ci/run
def test_fsdp_trains_checkpoints_resumes_and_gathers_whole_weights(tiny_gemma4_dir, even_demo_dir, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    # the first segment of `split` stops after 3 steps on the same 6-step schedule; the second resumes from step 2
    _fsdp_run(whole, tiny_gemma4_dir, even_demo_dir, "trainer.max_steps=6", "eval_after_train=false")
    _fsdp_run(split, tiny_gemma4_dir, even_demo_dir, "trainer.max_steps=3", "optim.schedule_steps=6",
              "eval_after_train=false")
    proc = _fsdp_run(split, tiny_gemma4_dir, even_demo_dir, "trainer.max_steps=6")

    # exact resume under FSDP: the same per-step losses as the uninterrupted run
    expected, got = _losses(whole), _losses(split)
    assert sorted(got) == sorted(expected) == list(range(6))
    assert max(abs(got[s] - expected[s]) for s in expected) <= 1e-6

    # checkpoints and the final export hold whole trainable tensors (not one rank's shards) under clean names
    model = build_model(compose_train(tiny_gemma4_dir, even_demo_dir, "backbone.dtype=bfloat16"))
    shapes = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    final = load_file(split / "final" / "trainable.safetensors")
    assert {k: v.shape for k, v in final.items()} == shapes
    state = torch.load(sorted((split / "checkpoints").glob("*.ckpt"))[-1], weights_only=True)["state_dict"]
    assert {k.removeprefix("net."): v.shape for k, v in state.items()} == shapes
    reference = load_file(whole / "final" / "trainable.safetensors")
    assert all(torch.allclose(final[k], reference[k], atol=1e-6) for k in final)

    # FSDP's result is one process's: the same start, each step's two rank batches with their gradients averaged.
    # Both compute the same bf16 / fp32 operations on the same inputs; what differs is the order of the fp32 sums
    # that average the two ranks' gradients (FSDP's reduce-scatter vs autograd's accumulation), about one ulp a
    # step (1.2e-7 measured after 6 steps): 1e-6 is that with a 10x margin, and 1000x below how far the weights move
    start, single, single_losses = _single_process_reference(tiny_gemma4_dir, even_demo_dir, steps=6)
    assert [got[s] for s in range(6)] == pytest.approx(single_losses, abs=1e-6)  # rank 0's batch, as logged
    assert max((single[k] - start[k]).abs().max().item() for k in single) > 1e-3  # six steps moved the weights ...
    worst = max((final[k] - single[k]).abs().max().item() for k in final)
    assert worst <= 1e-6, worst  # ... and FSDP's six steps land where the single process's do

    adapter = load_file(split / "final" / "adapter" / "adapter_model.safetensors")
    assert adapter and all(torch.equal(v, final[k.replace("base_model.model.model.language_model.",
                                                          "backbone.decoder.").replace(".weight", ".default.weight")])
                           for k, v in adapter.items())
    # rank 0 evaluated a whole copy rebuilt from the run directory, on all of val
    assert json.loads((split / "eval.json").read_text())["overall"]["n"] == 12
    assert proc.stdout.count("task             n") == 1


def _single_process_reference(backbone: Path, demo: Path, steps: int) -> tuple[dict, dict, list[float]]:
    """`steps` plain AdamW steps in this process, no Lightning and no FSDP: the model built as the run builds it
    (seed, then build_model), each rank's batch read by the loader as that rank reads it (RANK / WORLD_SIZE), the
    two losses halved and backpropagated into one gradient (FSDP averages over ranks), the run's optimiser and
    schedule (no clipping under FSDP). Returns the trainable weights before and after, and rank 0's losses."""
    cfg = compose_train(backbone, demo, "backbone.dtype=bfloat16", "data.batch_size=2", "data.resampled=false",
                        "data.cache_gb=0", f"trainer.max_steps={steps}")
    L.seed_everything(cfg.seed, workers=True)
    model = build_model(cfg).train()
    model.run_idle_projectors = True  # as under FSDP: a projector a batch lacks gets a zero gradient, not none
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    batches = []
    for rank in (0, 1):
        with pytest.MonkeyPatch.context() as env:
            env.setenv("RANK", str(rank))
            env.setenv("WORLD_SIZE", "2")
            loader = make_loader(cfg.data, run_preprocessor(model, cfg.data), train=True, seed=cfg.seed)
            batches.append(list(itertools.islice(loader, steps)))
    optim = cfg.optim
    optimizer, scheduler = build_optimizer(model, lr=optim.lr, weight_decay=optim.weight_decay, betas=optim.betas,
                                           warmup_steps=optim.warmup_steps, total_steps=steps)
    losses = []
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        for rank in (0, 1):
            loss = model(**model_inputs(batches[rank][step])).loss
            (loss / 2).backward()
            if rank == 0:
                losses.append(loss.item())
        optimizer.step()
        scheduler.step()
    return start, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, losses


def _units_have_one_dtype(model, policy) -> bool:
    """Each parameter belongs to its innermost FSDP unit (the root for none); does every unit hold one dtype?"""
    units, dtypes = {id(m) for m in model.modules() if policy._lambda_fn(m)}, {}

    def assign(module, unit):
        unit = id(module) if id(module) in units else unit
        for p in module.parameters(recurse=False):
            dtypes.setdefault(unit, set()).add(p.dtype)
        for child in module.children():
            assign(child, unit)

    assign(model, None)
    return all(len(found) == 1 for found in dtypes.values())


def test_wrap_policy_gives_each_unit_one_dtype(tiny_gemma4_dir, even_demo_dir):
    """FSDP flattens a unit into one tensor of one dtype: fp32 adapters and projectors get units of their own."""
    from torch.distributed.fsdp.wrap import CustomPolicy

    from gemma_fusion.training.fsdp import auto_wrap_policy

    model = build_model(compose_train(tiny_gemma4_dir, even_demo_dir, "backbone.dtype=bfloat16"))
    layer = type(model.backbone.decoder.layers[0])
    assert _units_have_one_dtype(model, auto_wrap_policy([f"{layer.__module__}.{layer.__name__}"]))
    assert not _units_have_one_dtype(model, CustomPolicy(lambda m: isinstance(m, layer)))  # layers alone: mixed
