"""The GPU benchmark's code path, shrunk to run on a CPU (bench/gpu.sh runs the same code at full size), and the
CPU benchmarks comparing like with like."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from transformers.models.gemma4_unified.image_processing_gemma4_unified import Gemma4UnifiedImageProcessor

from gemma_fusion.data.image import ImagePreprocessor

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_runs_every_measurement_on_a_cpu(tmp_path):
    out = subprocess.run([sys.executable, "bench/gpu_bench.py", "--cpu-smoke", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "gpu.json").read_text().splitlines()]
    assert not [r for r in rows if "error" in r]
    train = [r for r in rows if r["measure"] == "train"]
    assert len(train) == 1 and train[0]["tokens_per_s"] > 0
    assert train[0]["last_loss"] < train[0]["first_loss"]  # 3 AdamW steps on one batch: the timed steps train
    decode = {(r["quant"], r["backend"]) for r in rows if r["measure"] == "decode"}
    assert {("bf16", "native"), ("int8", "native"), ("int4", "native")} <= decode
    assert all(r["decode_tokens_per_s"] > 0 for r in rows if r["measure"] == "decode")


def _bench(name: str):
    """A bench script as a module (bench/ on the path: the scripts import their shared `common`)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return module


def test_loader_bench_compares_like_with_like():
    """The fair comparisons of bench/loader.py do the pipeline's work: transformers' batched processor call gives
    the pipeline's uint8 pixel values, and the bare floor's resize gives the pipeline's resized pixels."""
    loader = _bench("loader")
    rng = np.random.default_rng(0)
    images = [loader.photo_like(rng, int(rng.integers(640, 1025)), int(rng.integers(480, 769))) for _ in range(3)]
    theirs = loader.hf_batch(Gemma4UnifiedImageProcessor(), images)
    assert theirs["pixel_values"].dtype == torch.uint8
    for image, pixels, n in zip(images, theirs["pixel_values"], theirs["num_soft_tokens_per_image"]):
        ours, _ = ImagePreprocessor(loader.MAX_SOFT_TOKENS)(image)
        assert ours.dtype == torch.uint8 and torch.equal(pixels[:n], ours)
        resized = loader.resize_like_pipeline(image)  # 1, C, H, W -> the pipeline's tokens, cut by hand
        side = 48
        blocks = resized[0].permute(1, 2, 0).unfold(0, side, side).unfold(1, side, side)  # gh, gw, C, a, b
        assert torch.equal(blocks.permute(0, 1, 3, 4, 2).reshape(-1, side * side * 3), ours)


def test_train_step_bench_trains_the_same_parameters_in_every_variant(monkeypatch):
    """ours (train.py's set_trainable), theirs (transformers + peft) and the hand-written limit train the same
    tensors: the LoRA adapters and the vision and audio embedders (shapes compared name by name)."""
    train_step = _bench("train_step")
    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # `ours` imports bench/common.py when it runs

    def trainable(model) -> list[tuple[int, ...]]:
        return sorted(tuple(p.shape) for p in model.parameters() if p.requires_grad)

    shapes = {kind: trainable(getattr(train_step, kind)(*train_step.build(vocab=1024))[0])
              for kind in ("ours", "theirs", "limit")}
    assert shapes["ours"] == shapes["theirs"] == shapes["limit"]
    config = train_step.build(vocab=1024)[0].config
    audio = (config.get_text_config().hidden_size, config.audio_config.audio_embed_dim)
    assert audio in shapes["theirs"]  # the audio embedder's projection trains in theirs too
