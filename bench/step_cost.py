"""What a frozen backbone saves: projector-only vs LoRA vs full fine-tuning steps, and the cost of gradient checkpointing.

    python bench/step_cost.py [--repeats 5]

One tiny Gemma 4 unified model whose decoder dominates the FLOPs (hidden 512, 4 layers, FFN 2048, a 4,096-token
vocabulary), batch 4 of one 280-token image + 64 text tokens (16 targets), float32 on CPU, gemma_fusion's
FusionModel (LM head on the target positions only). Variants, timed round-robin in one process (so drifting
load on shared cores hits all alike), median of `--repeats` forward + backward passes each (the optimizer step
is left out: its cost depends on the optimizer, not on the backward pass):

- projector: only the vision embedder trains; the frozen decoder still back-propagates activation gradients
  (no weight gradients): about 4N FLOPs per token against 6N for full fine-tuning, so ~0.67x expected;
- lora: + LoRA r16 on every decoder linear layer;
- full: every decoder weight trains too;
- *_ckpt: the same with `model.gradient_checkpointing=true` (each decoder layer recomputed in backward).

Besides time, the bytes of the tensors autograd saves for backward (activation memory; counted with
`torch.autograd.graph.saved_tensors_hooks`, each storage once) — what checkpointing trades time for.
Prints one JSON line: per variant the median seconds and saved bytes, and the ratios
projector/full, lora/full, ckpt/plain.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import time

import torch

from gemma_fusion.artifacts.rundir import environment

HIDDEN, LAYERS, VOCAB, BATCH, IMAGE_TOKENS, TEXT_TOKENS, TARGETS = 512, 4, 4096, 4, 280, 64, 16


def build():
    """(FusionModel, batch) on a random tiny Gemma 4 (seeded), built like bench/train_step.py."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import train_step  # bench/train_step.py: the same model and batch, other sizes

    full, batch = train_step.build(vocab=VOCAB, hidden=HIDDEN, layers=LAYERS)
    model, _ = train_step.ours(full, batch)  # (LoRA injected; variants below set what trains)
    return model, batch


def set_variant(model, variant: str) -> None:
    for name, p in model.named_parameters():
        if name.startswith("vision."):
            p.requires_grad_(True)
        elif "lora_" in name:
            p.requires_grad_(variant in ("lora", "full"))  # (full: adapters too; they are a rounding error)
        else:
            p.requires_grad_(variant == "full")


class SavedBytes:
    """Bytes of the tensors autograd saves for backward during one forward (each storage counted once)."""

    def __init__(self):
        self.seen, self.bytes = set(), 0

    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.seen:
            self.seen.add(storage.data_ptr())
            self.bytes += storage.nbytes()
        return t


def step(model, batch) -> tuple[float, int]:
    saved = SavedBytes()
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed, saved.bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from gemma_fusion.models.build import checkpoint_layers

    model, batch = build()
    checkpointed = copy.deepcopy(model)
    checkpoint_layers(checkpointed.backbone.decoder)
    variants = {"projector": model, "lora": model, "full": model,
                "projector_ckpt": checkpointed, "full_ckpt": checkpointed}
    times = {v: [] for v in variants}
    saved = {}
    for i in range(args.repeats + 1):  # round 0 warms up
        for name, m in variants.items():
            set_variant(m, name.removesuffix("_ckpt"))
            m.train()
            elapsed, nbytes = step(m, batch)
            if i:
                times[name].append(elapsed)
            saved[name] = nbytes
    med = {v: statistics.median(t) for v, t in times.items()}
    print(json.dumps({
        "projector_vs_full": round(med["projector"] / med["full"], 4),
        "lora_vs_full": round(med["lora"] / med["full"], 4),
        "expected_projector_vs_full_by_flops": round(4 / 6, 4),
        "checkpointing_time_cost": {"projector": round(med["projector_ckpt"] / med["projector"], 4),
                                    "full": round(med["full_ckpt"] / med["full"], 4)},
        "checkpointing_saved_bytes_ratio": {"projector": round(saved["projector_ckpt"] / saved["projector"], 4),
                                            "full": round(saved["full_ckpt"] / saved["full"], 4)},
        "median_step_s": {v: round(t, 4) for v, t in med.items()}, "saved_for_backward_bytes": saved,
        "config": {"hidden": HIDDEN, "layers": LAYERS, "vocab": VOCAB, "batch": BATCH, "image_tokens": IMAGE_TOKENS,
                   "text_tokens": TEXT_TOKENS, "targets": TARGETS, "dtype": "float32", "repeats": args.repeats},
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch_threads": torch.get_num_threads()},
        "environment": environment(),
        "date": datetime.date.today().isoformat(),
    }))


if __name__ == "__main__":
    main()
