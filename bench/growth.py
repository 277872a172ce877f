"""How a projector + LoRA training step's time and peak memory grow with image tokens, audio length and text length.

    python bench/growth.py [--steps 3] [--out bench/out/growth.png]

The configuration: gemma_fusion's `FusionModel` on a Gemma 4 unified model with the real 262,144-token vocabulary,
hidden 256, 2 decoder layers (one sliding, window 512, one global; random weights, seeded), batch 1, float32 on
CPU, the vision and audio embedders and LoRA r16 (alpha 32) on every linear layer of the decoder trainable,
AdamW. Three sweeps, each row ending in 32 text tokens of which the last 16 are targets:

- image: bos, boi, 70 | 140 | 280 | 560 | 1120 image tokens (Gemma 4's budgets), eoi, text;
- audio: bos, boa, 1 | 5 | 10 | 30 s of audio (25 tokens/s, frames of 640 samples), eoa, text;
- text: 128 | 512 | 2048 tokens of text only (bos + text, the last 16 targets).

Each sweep runs in its own process (`--worker image|audio|text`), its points in increasing size. Per point: one
warm-up step, then `--steps` timed steps; time is their median. Memory is the process's resident set (Linux): after
the warm-up, freed heap is handed back to the OS (glibc `malloc_trim`) and the high-water mark `VmHWM` is reset to
the current resident size (`/proc/self/clear_refs`, value 5), so `peak_rss_mb` is that point's own peak (imports,
model, optimizer state and the step together), and `step_mb` = that peak - the resident size of the built model
before any step: the optimizer state (LoRA + projectors, a few MB) plus what a step adds (activations, gradients,
LM-head logits over the 16 targets, temporaries). Where the reset is unavailable `ru_maxrss` is used instead: the
peak so far in the sweep, which is the point's own peak only because points grow (`memory_method` says which).

Writes a PNG (time and memory against sequence tokens, one line per sweep) to `--out` and prints one JSON
line: every point, and per sweep the least-squares slope of step time (ms per 1k tokens) and of step memory
(MB per 1k tokens) against sequence length.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import image_grid

VOCAB, HIDDEN, LAYERS, BATCH, TAIL, TARGETS = 262_144, 256, 2, 1, 32, 16
SWEEPS = {"image": (70, 140, 280, 560, 1120), "audio": (1, 5, 10, 30), "text": (128, 512, 2048)}
UNITS = {"image": "image tokens", "audio": "seconds", "text": "tokens"}
FRAME = 640  # samples per audio soft token: the audio projector's frame_dim (25 tokens per second)


def build_model(seed: int = 0):
    """FusionModel with the checkpoint's vision and audio embedders as projectors, LoRA r16, trainable set."""
    import torch
    from transformers import Gemma4UnifiedForConditionalGeneration

    from common import fusion_model
    from gemma_fusion.models.tiny import tiny_gemma4_config

    torch.manual_seed(seed)
    config = tiny_gemma4_config(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=64, intermediate_size=4 * HIDDEN, vocab_size=VOCAB,
                                audio_samples_per_token=FRAME)
    return fusion_model(Gemma4UnifiedForConditionalGeneration(config).eval()).train()


def make_batch(model, sweep: str, size: int, seed: int = 0) -> dict:
    """One row of the sweep at `size` (image tokens, audio seconds or text tokens); the last 16 tokens are targets."""
    import torch

    from gemma_fusion.core.batch import AUDIO, IMAGE, SAMPLE_RATE

    g = torch.Generator().manual_seed(seed)
    t = model.tokens
    text = lambda n: torch.randint(300, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    batch = {}
    if sweep == "image":
        width, height = image_grid(size)
        ids = [t.bos, *t.image_start, *[t.image_token] * size, *t.image_end, *text(TAIL)]
        positions = torch.tensor([(x, y) for y in range(height) for x in range(width)])
        batch.update(pixel_values=torch.rand(BATCH, size, model.vision.patch_dim, generator=g),
                     image_position_ids=positions.expand(BATCH, -1, -1).contiguous())
    elif sweep == "audio":
        frames = size * SAMPLE_RATE // model.audio.frame_dim  # soft tokens of `size` seconds
        ids = [t.bos, *t.audio_start, *[t.audio_token] * frames, *t.audio_end, *text(TAIL)]
        batch.update(input_features=torch.randn(BATCH, frames, model.audio.frame_dim, generator=g) * 0.1,
                     input_features_mask=torch.ones(BATCH, frames, dtype=torch.bool))
    else:
        ids = [t.bos, *text(size - 1)]
    input_ids = torch.tensor(ids).expand(BATCH, -1).contiguous()
    labels = torch.full_like(input_ids, -100)
    labels[:, -TARGETS:] = input_ids[:, -TARGETS:]
    mm = torch.zeros_like(input_ids)
    if sweep == "image":
        mm[input_ids == t.image_token] = IMAGE
    elif sweep == "audio":
        mm[input_ids == t.audio_token] = AUDIO
    return dict(batch, input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels,
                mm_token_type_ids=mm)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak() -> bool:
    """Hand freed heap back to the OS, then reset the resident high-water mark to the current resident size
    (Linux >= 4.0); False where the reset is unavailable."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: freed heap may stay resident
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(sweep: str, steps: int) -> list[dict]:
    import torch

    model = build_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(batch) -> float:
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    # the resident size of the built model, before any step
    model_kb = _status_kb("VmRSS") if reset_peak() else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    points = []
    for size in SWEEPS[sweep]:
        batch = make_batch(model, sweep, size)
        step(batch)  # warm-up (and the optimizer's state on the first point)
        exact = reset_peak()
        times = [step(batch) for _ in range(steps)]
        peak_kb = _status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        seq = batch["input_ids"].shape[1]
        points.append({
            "sweep": sweep, "size": size, "unit": UNITS[sweep],
            "media_tokens": 0 if sweep == "text" else seq - TAIL - 3, "seq_tokens": seq,
            "median_step_ms": round(1000 * statistics.median(times), 2),
            "peak_rss_mb": round(peak_kb / 1024, 1), "step_mb": round((peak_kb - model_kb) / 1024, 1),
            "memory_method": "VmHWM reset per point" if exact else "ru_maxrss, peak so far",
        })
        print(json.dumps(points[-1]), file=sys.stderr, flush=True)
    return points


def run_worker(sweep: str, steps: int) -> list[dict]:
    out = subprocess.run([sys.executable, __file__, "--worker", sweep, "--steps", str(steps)], capture_output=True,
                         text=True)
    if out.returncode:
        sys.exit(f"the {sweep} sweep failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def slope_per_1k(points: list[dict], key: str) -> float:
    """Least-squares slope of `key` against sequence tokens, per 1,000 tokens."""
    values = [p[key] for p in points]
    return round(1000 * statistics.linear_regression([p["seq_tokens"] for p in points], values).slope, 3)


def plot(sweeps: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for sweep, points in sweeps.items():
        x = [p["seq_tokens"] for p in points]
        label = {"image": "image (70 .. 1120 tokens)", "audio": "audio (1 .. 30 s)", "text": "text only"}[sweep]
        ax_t.plot(x, [p["median_step_ms"] for p in points], "o-", label=label)
        ax_m.plot(x, [p["step_mb"] for p in points], "o-", label=label)
    ax_t.set(xlabel="sequence tokens", ylabel="median step time (ms)", title="step time")
    ax_m.set(xlabel="sequence tokens", ylabel="MB", title="peak RSS - RSS of the built model")
    for ax in (ax_t, ax_m):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"FusionModel projector + LoRA r16 step: hidden {HIDDEN}, {LAYERS} layers, vocab {VOCAB:,}, "
                 f"batch {BATCH}, fp32 CPU")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per point (after one warm-up)")
    parser.add_argument("--out", type=Path, default=Path("bench/out/growth.png"), help="the plot (PNG)")
    parser.add_argument("--worker", choices=list(SWEEPS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps)))
        return
    from gemma_fusion.artifacts.rundir import environment  # (not in the workers, whose memory is measured)
    from gemma_fusion.core.batch import SAMPLE_RATE

    start = time.perf_counter()
    sweeps = {sweep: run_worker(sweep, args.steps) for sweep in SWEEPS}
    plot(sweeps, args.out)
    print(json.dumps({
        "slopes": {sweep: {"ms_per_1k_tokens": slope_per_1k(points, "median_step_ms"),
                           "step_mb_per_1k_tokens": slope_per_1k(points, "step_mb")}
                   for sweep, points in sweeps.items()},
        "points": [p for points in sweeps.values() for p in points],
        "plot": str(args.out),
        "config": {"vocab": VOCAB, "hidden": HIDDEN, "layers": LAYERS, "batch": BATCH, "text_tail": TAIL,
                   "targets": TARGETS, "audio_tokens_per_s": SAMPLE_RATE // FRAME, "frame_samples": FRAME,
                   "dtype": "float32", "steps_timed": args.steps,
                   "trainable": "vision + audio embedders, LoRA r16 on all decoder linears"},
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch_threads": __import__("torch").get_num_threads()},
        "wall_s": round(time.perf_counter() - start, 1),
        "environment": environment(),
        "date": datetime.date.today().isoformat(),
    }))


if __name__ == "__main__":
    main()
