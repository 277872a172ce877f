"""Training MFU and decode speed of gemma_fusion on a Gemma-4-12B-shaped slice, on one GPU (`bench/gpu.sh` runs it).

    python bench/gpu_bench.py [--out DIR]      # CUDA: the 12B slice
    python bench/gpu_bench.py --cpu-smoke      # the same code path, shrunk for the CPU (< 60 s)

The slice: the `gemma4_12b` preset (`gemma_fusion.inference.presets`) at full width (hidden 3840, FFN 15,360, 16 query
heads, 8 KV heads of 256 on sliding layers, window 1024, global layers with head_dim 512 and K = V, vocabulary
262,144) cut to 6 decoder layers, 5 sliding : 1 global as in the full model; random weights, seeded, bf16.

1. train: a FusionModel (the checkpoint's vision and audio embedders as projectors, float32), LoRA r16 (alpha 32,
   float32) on every linear layer of the decoder, AdamW, bf16 autocast (the trainer's `bf16-mixed`); batch 1 of
   4096 tokens: bos, boi, a 1120-token image, eoi, text, the last 16 text tokens targets. Warm-up steps, then timed
   steps with `torch.cuda.synchronize()`; median step time. Model FLOPs: `training.throughput.StepFlops`, the
   trainer's own count (frozen matmuls and the LM head x 2, attention and LoRA x 3 of
   `models.flops.backbone_forward_flops`), and `mfu_3x` from 3 x the whole forward count; both against the
   device's dense bf16 peak (`training.throughput.PEAK_BF16_TFLOPS`: 989 TFLOP/s for an H200). Peak memory:
   `torch.cuda.max_memory_allocated` over the steps (weights included).
2. decode: the same slice without LoRA, batch 1, a 1024-token text prompt prefilled, then 128 cached steps through
   `inference.generate.CachedDecoder` (greedy), each timed from the argmax to `synchronize()` after the step's
   logits; median step -> tokens/s. bf16, then int8 and int4 of `models.quant.quantize_frozen` (native backend),
   and torchao int8 when torchao imports. One untimed prefill + 2 steps first. `decoder_weight_gb`: the decoder's
   weights as stored, the token embedding (= the tied LM head, never quantised) included.

`--cpu-smoke`: 2 layers, hidden 256, vocabulary 4096 (`models.tiny.tiny_gemma4_config`), a 256-token row with a
70-token image, a 128-token prompt, 8 decode steps, on the CPU (MFU is then null: no known peak; peak
memory is the process's `ru_maxrss`).

One JSON line per measurement (machine, train, one per decode variant) on stdout and in `<out>/gpu.json`; a
measurement that fails gives its line with `error` and the others still run.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

from common import image_grid

import torch

TARGETS = 16


@dataclass(frozen=True)
class Sizes:
    layers: int
    seq: int
    image_tokens: int
    prompt: int
    decode_steps: int
    warmup_steps: int
    timed_steps: int


GPU = Sizes(layers=6, seq=4096, image_tokens=1120, prompt=1024, decode_steps=128, warmup_steps=3, timed_steps=10)
SMOKE = Sizes(layers=2, seq=256, image_tokens=70, prompt=128, decode_steps=8, warmup_steps=1, timed_steps=2)


def slice_12b_config(layers: int):
    """The gemma4_12b preset cut to `layers` decoder layers (every 6th global, the last global)."""
    from transformers import Gemma4UnifiedConfig

    from gemma_fusion.inference.presets import GEMMA4_12B_AUDIO, GEMMA4_12B_TEXT, GEMMA4_12B_VISION, gemma4_12b_config

    # Built from the preset's own dicts: the per-layer geometry (global head_dim, K = V) is derived from layer_types
    # when the config is created, so a finished 48-layer config cannot simply be shortened.
    types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(layers)]
    config = Gemma4UnifiedConfig(text_config=dict(GEMMA4_12B_TEXT, num_hidden_layers=layers, layer_types=types),
                                 vision_config=dict(GEMMA4_12B_VISION), audio_config=dict(GEMMA4_12B_AUDIO))
    full = gemma4_12b_config().text_config
    assert full.layer_types[:layers] == types, (full.layer_types[:layers], types)
    return config


def smoke_config():
    from gemma_fusion.models.tiny import tiny_gemma4_config

    return tiny_gemma4_config(hidden_size=256, num_hidden_layers=SMOKE.layers, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=64, intermediate_size=1024, vocab_size=4096)


def build_model(config, device: torch.device, lora: bool):
    """FusionModel on `device`: random bf16 backbone (seeded), float32 projectors from its embedders, LoRA r16."""
    from transformers import Gemma4UnifiedForConditionalGeneration

    from common import fusion_model

    torch.manual_seed(0)
    with torch.device(device):
        full = Gemma4UnifiedForConditionalGeneration._from_config(config, dtype=torch.bfloat16,
                                                                   attn_implementation="sdpa").eval()
    return fusion_model(full, lora).to(device)


def train_batch(model, sizes: Sizes, vocab: int, device: torch.device) -> dict:
    """bos, boi, image, eoi, text to `sizes.seq` tokens; the last 16 are targets. Types set by position, not by id."""
    from gemma_fusion.core.batch import IMAGE

    g = torch.Generator().manual_seed(0)
    t, n = model.tokens, sizes.image_tokens
    head = [t.bos, *t.image_start, *[t.image_token] * n, *t.image_end]
    input_ids = torch.cat([torch.tensor(head), torch.randint(300, vocab, (sizes.seq - len(head),), generator=g)])[None]
    mm = torch.zeros_like(input_ids)
    mm[:, 1 + len(t.image_start): 1 + len(t.image_start) + n] = IMAGE
    labels = torch.full_like(input_ids, -100)
    labels[:, -TARGETS:] = input_ids[:, -TARGETS:]
    width, height = image_grid(n)
    positions = torch.tensor([(x, y) for y in range(height) for x in range(width)])[None]
    batch = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels, mm_token_type_ids=mm,
                 pixel_values=torch.rand(1, n, model.vision.patch_dim, generator=g), image_position_ids=positions)
    return {k: v.to(device) for k, v in batch.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure_train(config, sizes: Sizes, device: torch.device) -> dict:
    from gemma_fusion.models.flops import backbone_forward_flops
    from gemma_fusion.training.throughput import StepFlops, device_peak_tflops, peak_memory_bytes

    model = build_model(config, device, lora=True).train()
    batch = train_batch(model, sizes, config.get_text_config().vocab_size, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    reset_memory(device)
    times, losses = [], []
    for i in range(sizes.warmup_steps + sizes.timed_steps):
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        losses.append(loss.item())
        if i >= sizes.warmup_steps:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    text_config, decoder = model.backbone.text_config, model.backbone.decoder
    flops = StepFlops(text_config, decoder)(batch, TARGETS)
    flops_3x = 3 * backbone_forward_flops(text_config, sizes.seq, TARGETS, decoder=decoder)["total"]
    peak = device_peak_tflops(device)
    mfu = lambda f: None if peak is None else round(f / step_s / (peak * 1e12), 4)  # noqa: E731
    return {"measure": "train", "tokens_per_s": round(sizes.seq / step_s, 1), "step_ms": round(1000 * step_s, 2),
            "step_ms_all": [round(1000 * s, 2) for s in times], "model_tflop_per_step": round(flops / 1e12, 4),
            "mfu": mfu(flops), "mfu_3x": mfu(flops_3x), "peak_tflops": peak,
            "peak_mem_gb": round(peak_memory_bytes(device) / 2**30, 3), "first_loss": round(losses[0], 4),
            "last_loss": round(losses[-1], 4), "trainable_params": sum(p.numel() for p in params),
            "seq": sizes.seq, "image_tokens": sizes.image_tokens, "targets": TARGETS, "batch": 1,
            "dtype": "bf16 weights, bf16 autocast, fp32 LoRA + projectors"}


def measure_decode(config, sizes: Sizes, device: torch.device, quant: str, backend: str) -> dict:
    from gemma_fusion.inference.generate import CachedDecoder
    from gemma_fusion.models.quant import quantize_frozen, tensor_bytes
    from gemma_fusion.training.throughput import peak_memory_bytes

    model = build_model(config, device, lora=False).eval()
    replaced = quantize_frozen(model.backbone.decoder, quant, backend=backend)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(300, config.get_text_config().vocab_size, (1, sizes.prompt), generator=g).to(device)
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=torch.zeros_like(ids))
    alive = torch.ones(1, dtype=torch.bool, device=device)
    with torch.inference_mode():
        warm = CachedDecoder(model, batch)  # untimed: kernels, allocator, cuBLAS heuristics
        logits = warm.start()
        for _ in range(2):
            logits = warm.step(logits.argmax(-1), alive)
        del warm, logits
        reset_memory(device)
        decoder = CachedDecoder(model, batch)
        sync(device)
        start = time.perf_counter()
        logits = decoder.start()
        sync(device)
        prefill_s = time.perf_counter() - start
        times = []
        for _ in range(sizes.decode_steps):
            start = time.perf_counter()
            logits = decoder.step(logits.argmax(-1), alive)
            sync(device)
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    return {"measure": "decode", "quant": quant if quant != "none" else "bf16", "backend": backend,
            "quantized_linears": replaced, "decode_tokens_per_s": round(1 / step_s, 1),
            "step_ms": round(1000 * step_s, 3), "step_ms_mean": round(1000 * statistics.mean(times), 3),
            "prefill_ms": round(1000 * prefill_s, 2), "prefill_tokens_per_s": round(sizes.prompt / prefill_s, 1),
            "prompt": sizes.prompt, "decode_steps": sizes.decode_steps, "batch": 1,
            "decoder_weight_gb": round(tensor_bytes(model.backbone.decoder) / 2**30, 3),
            "peak_mem_gb": round(peak_memory_bytes(device) / 2**30, 3)}


def machine(device: torch.device, sizes: Sizes, smoke: bool) -> dict:
    from gemma_fusion.artifacts.rundir import environment

    info = {"measure": "machine", "device": str(device), "torch": torch.__version__,
            "python": platform.python_version(),
            "slice": "tiny smoke" if smoke else "gemma4_12b", "sizes": asdict(sizes), "environment": environment()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["processor"] = platform.processor() or platform.machine()
        info["torch_threads"] = torch.get_num_threads()
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("."), help="directory of gpu.json")
    parser.add_argument("--cpu-smoke", action="store_true", help="shrink everything and run on the CPU")
    args = parser.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit("gpu_bench.py needs a CUDA device; use --cpu-smoke to check the code path on the CPU.")
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    sizes = SMOKE if args.cpu_smoke else GPU
    config = smoke_config() if args.cpu_smoke else slice_12b_config(sizes.layers)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu.json"
    path.write_text("")
    jobs = [("train", lambda: measure_train(config, sizes, device))]
    variants = [("none", "native"), ("int8", "native"), ("int4", "native")]
    try:
        import torchao  # noqa: F401

        variants.append(("int8", "torchao"))
    except ImportError:
        print("torchao is not importable: no torchao int8 line", file=sys.stderr)
    jobs += [(f"decode {q} {b}", lambda q=q, b=b: measure_decode(config, sizes, device, q, b)) for q, b in variants]
    emit(path, machine(device, sizes, args.cpu_smoke))
    for name, job in jobs:
        start = time.perf_counter()
        try:
            result = job()
        except Exception as err:  # noqa: BLE001 -- one failed measurement must not lose the others
            traceback.print_exc()
            result = {"measure": name, "error": f"{type(err).__name__}: {err}"[:500]}
        result["wall_s"] = round(time.perf_counter() - start, 1)
        emit(path, result)
        reset_memory(device)


def emit(path: Path, result: dict) -> None:
    line = json.dumps(result)
    print(line, flush=True)
    with path.open("a") as f:
        f.write(line + "\n")


if __name__ == "__main__":
    main()
