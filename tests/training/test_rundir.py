"""RunDir owns every path of a run: the layout it spells is the documented contract, a real run writes every file
it promises, resume=auto never picks a partial save, and no other module of the package spells a run's file name."""
from __future__ import annotations

import ast
import importlib.metadata
import json
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gemma_fusion.artifacts.rundir import ExportDir, RunDir, SweepDir

ROOT = Path(__file__).resolve().parents[2]

# The layout users script against (README / docs), written out by hand: RunDir must spell exactly this.
RUN_LAYOUT = {
    "config": "config.yaml",
    "environment": "environment.json",
    "overrides": ".hydra/overrides.yaml",
    "compute": "compute.json",
    "metrics": "metrics.csv",
    "checkpoints": "checkpoints",
    "final": "final",
    "trainable": "final/trainable.safetensors",
    "adapter": "final/adapter",
    "eval": "eval.json",
    "predictions": "eval_predictions.jsonl",
    "eval_compare": "eval_compare.json",
}
EXPORT_LAYOUT = {"meta": "export.json", "model": "model.safetensors", "projectors": "projectors.safetensors"}
SWEEP_LAYOUT = {"report": "report.md", "loss_curves": "loss_curves.png", "metric_vs_compute": "metric_vs_compute.png",
                "scaling": "scaling.png"}
# what a finished run holds after `python train.py checkpoint.every_n_steps=1 trainer.max_steps=2` (LoRA on) and
# `python eval.py run=RUN compare=[RUN]`
FINISHED_RUN = ["config.yaml", "environment.json", ".hydra/overrides.yaml", "compute.json", "metrics.csv", "checkpoints/step-0000001.ckpt",
                "checkpoints/step-0000002.ckpt", "final/trainable.safetensors", "final/adapter/adapter_config.json",
                "final/adapter/adapter_model.safetensors", "eval.json", "eval_predictions.jsonl", "eval_compare.json"]


def test_rundir_spells_the_documented_layout(tmp_path):
    for layout, kind in ((RUN_LAYOUT, RunDir), (EXPORT_LAYOUT, ExportDir), (SWEEP_LAYOUT, SweepDir)):
        spelt = {name: getattr(kind(tmp_path), name).relative_to(tmp_path).as_posix() for name in layout}
        assert spelt == layout
    run = RunDir(tmp_path)
    assert run.next_metrics_segment().name == "metrics.segment-000.csv"
    run.next_metrics_segment().write_text("step\n")
    assert [p.name for p in run.metrics_segments()] == ["metrics.segment-000.csv"]
    assert run.next_metrics_segment().name == "metrics.segment-001.csv"


def test_newest_checkpoint_ignores_and_removes_partial_saves(tmp_path):
    run = RunDir(tmp_path)
    assert run.newest_checkpoint() is None  # no checkpoints/ yet
    run.checkpoints.mkdir()
    for name in ("step-0000002.ckpt", "step-0000004.ckpt", "step-0000006.ckpt.tmp"):
        (run.checkpoints / name).write_bytes(b"x")
    assert run.newest_checkpoint(remove_partial=False) == run.checkpoints / "step-0000004.ckpt"
    assert [p.name for p in run.partial_checkpoints()] == ["step-0000006.ckpt.tmp"]
    assert run.newest_checkpoint() == run.checkpoints / "step-0000004.ckpt"
    assert run.partial_checkpoints() == []  # a kill's leftover is removed by resume=auto


def test_kind_tells_a_run_an_export_and_anything_else(tmp_path):
    run, export, other = (tmp_path / name for name in ("run", "export", "other"))
    for path in (run, export, other):
        path.mkdir()
    RunDir(run).config.write_text("seed: 0\n")
    ExportDir(export).meta.write_text("{}")
    (other / "notes.txt").write_text("")
    assert [RunDir(p).kind() for p in (run, export, other, tmp_path / "missing")] == ["run", "export", None, None]
    assert not RunDir(run).is_finished()


def _string_constants(tree: ast.Module):
    """Every string constant of a module except docstrings (which may describe the layout)."""
    docs = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body:
            if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docs.add(id(body[0].value))
    return [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


def test_only_the_rundir_module_spells_a_runs_file_names():
    names = [p for layout in (RUN_LAYOUT, EXPORT_LAYOUT, SWEEP_LAYOUT) for p in layout.values()
             if "." in p and p != "model.safetensors"]  # (transformers' own name for any checkpoint's weights)
    pattern = re.compile(r"(?<![\w.])(" + "|".join(re.escape(Path(p).name) for p in names) + r")")
    found = [f"{path.relative_to(ROOT)}:{node.lineno}: {node.value[:60]!r}"
             for path in sorted((ROOT / "gemma_fusion").rglob("*.py")) if path.name != "rundir.py"
             for node in _string_constants(ast.parse(path.read_text())) if pattern.search(node.value)]
    assert not found, "spell run-directory paths through gemma_fusion.artifacts.rundir:\n" + "\n".join(found)


@pytest.fixture(scope="module")
def finished_run(tiny_gemma4_dir, tiny_demo_dir, tmp_path_factory) -> Path:
    """A real run through the commands users type: train.py (checkpoints, LoRA, eval after training), then
    eval.py comparing the run with itself."""
    run_dir = tmp_path_factory.mktemp("rundir") / "run"
    train = [f"hydra.run.dir={run_dir}", f"backbone.path={tiny_gemma4_dir}", "~backbone.pretrain",
             f"data.train={tiny_demo_dir}/train", f"data.val={tiny_demo_dir}/val", "data.prepare_demo=false",
             "data.batch_size=4", "data.eval_batch_size=4", "data.num_workers=0", "data.shuffle_buffer=0",
             "data.image_tokens=8", "trainer.max_steps=2", "trainer.enable_progress_bar=false",
             "optim.warmup_steps=1", "checkpoint.every_n_steps=1", "lora=qv_r8"]
    for command in (["train.py", *train], ["eval.py", f"run={run_dir}", f"compare=[{run_dir}]"]):
        proc = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return run_dir


def test_a_real_run_holds_every_file_the_layout_promises(finished_run):
    missing = [p for p in FINISHED_RUN if not (finished_run / p).is_file()]
    assert not missing, f"missing from {finished_run}: {missing}"
    run = RunDir(finished_run)
    for name in RUN_LAYOUT:  # every path RunDir spells is there (files and folders)
        assert getattr(run, name).exists(), name
    assert run.kind() == "run" and run.is_finished()
    assert run.newest_checkpoint() == finished_run / "checkpoints/step-0000002.ckpt"
    assert run.load_config().trainer.max_steps == 2
    assert "lora=qv_r8" in run.read_overrides()
    assert run.read_compute()["designs"]["lora"] == "qv_r8"
    assert run.read_eval() == json.loads(run.eval.read_text()) and run.read_eval()["overall"]["n"] > 0


def test_a_run_records_the_environment_its_figures_come_from(finished_run):
    env = RunDir(finished_run).read_environment()
    installed = {name: importlib.metadata.version(name)
                 for name in ("torch", "transformers", "peft", "lightning", "torchaudio")}
    assert {k: env[k] for k in installed} == installed
    assert env["python"] == platform.python_version()
    cpuinfo = Path("/proc/cpuinfo")
    assert env["cpu"] and (not cpuinfo.is_file() or f": {env['cpu']}\n" in cpuinfo.read_text())
    import torch

    assert env["gpu"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)


def test_a_run_resumed_elsewhere_keeps_the_earlier_environment(tmp_path):
    run = RunDir(tmp_path)
    first = {"python": "3.11.7", "torch": "2.11.0", "cpu": "AMD EPYC", "gpu": None}
    run.write_environment(first)
    run.write_environment(first)  # resumed on the same machine: nothing to keep
    assert run.read_environment() == first
    moved = {**first, "torch": "2.12.0", "gpu": "NVIDIA H100"}
    run.write_environment(moved)
    assert run.read_environment() == {**moved, "earlier": [first]}
