"""One projector + LoRA training step: gemma_fusion against transformers + peft, and against the best hand-written step.

    python bench/train_step.py [--steps 5] [--their-steps 3]

The configuration (the same in all three): a Gemma 4 unified model with the real 262,144-token vocabulary,
hidden 256, 2 decoder layers (random weights, seeded: identical in every process), batch 4 of one 280-token
image + 64 text tokens of which the last 16 are targets, float32 on CPU, the vision and audio embedders (what
train.py trains; the audio one gets no gradient, the batch has no audio) and LoRA r16 (alpha 32) on every linear
layer of the decoder trainable: the same parameters in all three (asserted), AdamW. Each runs in its own process
(`--worker ours|theirs|limit`), one warm-up step then timed steps, and reports its median step time
and its peak resident memory (`ru_maxrss`, the whole process):

- ours: `FusionModel` (gemma_fusion's LM head and loss on the 16 x 4 target positions only), LoRA injected
  by `gemma_fusion.models.trainable.add_lora`;
- theirs: `Gemma4UnifiedForConditionalGeneration(**batch, labels=...)` with `peft.get_peft_model` on the same
  modules — what a user would otherwise write (full-sequence logits, transformers' loss);
- limit: the best step a user could hand-write on transformers' model for the same work: hidden states from
  `model.model(...)`, the LM head (+ soft-cap) and cross-entropy on the target positions only.

Prints one JSON line: time_ratio (ours / theirs; target <= 0.15), memory_ratio (<= 0.3), limit_ratio
(ours / limit; <= 1.05), the absolute figures, the first-step losses (equal: LoRA's B starts at zero, so all
three compute the same function) and the machine.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

VOCAB, HIDDEN, LAYERS, BATCH, IMAGE_TOKENS, TEXT_TOKENS, TARGETS = 262_144, 256, 2, 4, 280, 64, 16


def build(seed: int = 0, vocab: int = VOCAB, hidden: int = HIDDEN, layers: int = LAYERS):
    """(transformers model, batch) — the same weights and batch in every process."""
    import torch
    from transformers import Gemma4UnifiedForConditionalGeneration

    from gemma_fusion.core.batch import IMAGE
    from gemma_fusion.models.tiny import tiny_gemma4_config

    torch.manual_seed(seed)
    config = tiny_gemma4_config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=64, intermediate_size=4 * hidden, vocab_size=vocab)
    full = Gemma4UnifiedForConditionalGeneration(config).eval()
    text = config.get_text_config()
    g = torch.Generator().manual_seed(seed)
    patch_dim = config.vision_config.patch_size ** 2 * config.vision_config.pooling_kernel_size ** 2 * 3
    width, height = 20, IMAGE_TOKENS // 20
    positions = torch.tensor([(x, y) for y in range(height) for x in range(width)]).expand(BATCH, -1, -1)
    ids = [text.bos_token_id, config.boi_token_id, *[config.image_token_id] * IMAGE_TOKENS, config.eoi_token_id]
    input_ids = torch.cat([torch.tensor(ids).expand(BATCH, -1),
                           torch.randint(300, vocab, (BATCH, TEXT_TOKENS), generator=g)], dim=1)
    labels = torch.full_like(input_ids, -100)
    labels[:, -TARGETS:] = input_ids[:, -TARGETS:]
    mm = (input_ids == config.image_token_id).long() * IMAGE
    batch = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                 pixel_values=torch.rand(BATCH, IMAGE_TOKENS, patch_dim, generator=g),
                 image_position_ids=positions.contiguous(), mm_token_type_ids=mm, labels=labels)
    return full, batch


def ours(full, batch):
    from common import fusion_model

    model = fusion_model(full).train()
    return model, lambda: model(**batch).loss


def theirs(full, batch):
    from peft import LoraConfig, get_peft_model

    from common import LORA_TARGETS

    target = r"model\.language_model\.layers\.\d+\..*\.(" + "|".join(LORA_TARGETS) + ")"
    model = get_peft_model(full, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=target))
    for embedder in (full.model.embed_vision, full.model.embed_audio):  # what set_trainable trains in ours
        embedder.requires_grad_(True)
    model.train()
    return model, lambda: model(**batch).loss


def limit(full, batch):
    import torch.nn.functional as F

    peft_model, _ = theirs(full, batch)
    softcap = full.config.get_text_config().final_logit_softcapping
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    targets = batch["labels"][:, 1:]
    selected = targets != -100

    def step():
        hidden = full.model(**inputs).last_hidden_state
        logits = full.lm_head(hidden[:, :-1][selected])
        if softcap is not None:
            logits = (logits / softcap).tanh() * softcap
        return F.cross_entropy(logits.float(), targets[selected])

    return peft_model, step


def worker(kind: str, steps: int) -> dict:
    import torch

    full, batch = build()
    model, loss_fn = {"ours": ours, "theirs": theirs, "limit": limit}[kind](full, batch)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    times, losses = [], []
    for i in range(steps + 1):  # the first is a warm-up
        start = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        losses.append(loss.item())
        if i:
            times.append(elapsed)
    return {"worker": kind, "median_step_s": statistics.median(times), "steps_timed": steps,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "first_loss": losses[0], "trainable_params": sum(p.numel() for p in params)}


def run_worker(kind: str, steps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", kind, "--steps", str(steps)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps of ours and of the hand-written limit")
    parser.add_argument("--their-steps", type=int, default=3, help="timed steps of transformers + peft (slow)")
    parser.add_argument("--worker", choices=["ours", "theirs", "limit"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps)))
        return
    from gemma_fusion.artifacts.rundir import environment  # (not in the workers, whose memory is measured)

    results = {kind: run_worker(kind, args.their_steps if kind == "theirs" else args.steps)
               for kind in ("ours", "theirs", "limit")}
    o, t, lim = results["ours"], results["theirs"], results["limit"]
    trainable = {kind: r["trainable_params"] for kind, r in results.items()}
    assert len(set(trainable.values())) == 1, f"the variants train different parameters: {trainable}"
    print(json.dumps({
        "time_ratio": round(o["median_step_s"] / t["median_step_s"], 4),
        "memory_ratio": round(o["peak_rss_bytes"] / t["peak_rss_bytes"], 4),
        "limit_ratio": round(o["median_step_s"] / lim["median_step_s"], 4),
        "targets": {"time_ratio": 0.15, "memory_ratio": 0.3, "limit_ratio": 1.05},
        "same_first_loss": max(abs(r["first_loss"] - o["first_loss"]) for r in results.values()) < 1e-3,
        "trainable_params": trainable,
        "workers": results, "config": {"vocab": VOCAB, "hidden": HIDDEN, "layers": LAYERS, "batch": BATCH,
                                       "image_tokens": IMAGE_TOKENS, "text_tokens": TEXT_TOKENS, "targets": TARGETS,
                                       "dtype": "float32",
                                       "trainable": "LoRA r16 on all decoder linear layers + vision and audio embedders"},
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch_threads": __import__("torch").get_num_threads()},
        "environment": environment(),
        "date": datetime.date.today().isoformat(),
    }))


if __name__ == "__main__":
    main()
