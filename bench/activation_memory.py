"""Prefill activation memory: the memory planner's estimate against the peak of a real prefill, by sequence length.

    python bench/activation_memory.py [--lengths 512 1024 2048 4096 8192] [--shapes gemma4_12b_tenth tiny wide_heads]

Each shape is a Gemma 4 unified model built in bf16 from a transformers config (random weights):
- gemma4_12b_tenth: the 12B preset's proportions at a tenth of its width: hidden 384, MLP 1536, 6 layers
  (5 sliding : 1 global), 16 query heads of 24 on sliding layers (8 KV heads), of 48 on the global layer
  (1 KV head, K = V), window 128 (the 12B's 1024 at 8k tokens is 8 windows; here 4 to 64);
- tiny: the project's `tiny` backbone preset (hidden 128, 4 layers, window 512), which the demo runs on;
- wide_heads: gemma4_12b_tenth with a global head_dim of 512 (q 21x as wide as the residual stream, so its
  fp32 q_norm is the largest phase); lengths up to 2048.

Each length S is one prompt prefilled as `gemma_fusion.inference.generate` does it for one unpadded row:
a 280-token image block (attended both ways, so the masks are materialised) and text up to S tokens, embedded
first (not measured), then `Backbone.forward` into an empty `DynamicCache` and the last position's logits.

How the peak is measured: `torch.profiler` with `profile_memory=True` records every allocation and free made
through torch's CPU allocator (the model's tensors and the kernels' temporaries) with the allocator's running
total; the peak is the largest total above the one when the prefill started. It counts bytes, so it is exact
and repeatable (a shared CPU changes only the time). Peak RSS would count glibc's retained arenas and
page-touch order instead of tensors, and tracemalloc does not see torch's allocations at all.

Subtracted from the peak: the planner's KV cache for S tokens (exact, tests/test_plan.py) and the attention
kernel's own scratch live at the peak (CPU flash attention's per-thread and fp32 buffers, which a GPU kernel
does not allocate alike; the planner leaves them to its workspace term). The rest, the measured activations,
is compared with `MemoryPlanner.activation_bytes(S)`: `ratio` = planned / measured, target 0.85 .. 1.15
(`ratio_with_scratch`: the same with the scratch left in). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import datetime
import json

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache, Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration

from gemma_fusion.artifacts.rundir import environment
from gemma_fusion.core.batch import IMAGE
from gemma_fusion.inference.plan import MemoryPlanner
from gemma_fusion.inference.presets import preset_config
from gemma_fusion.models.backbone import gemma4_spec, split_full_model
from gemma_fusion.models.fusion import FusionModel
from gemma_fusion.models.tiny import tiny_gemma4_config

IMAGE_TOKENS, GRID_WIDTH = 280, 20  # a 20 x 14 grid of merged 48-pixel patches
TARGET = (0.85, 1.15)


def gemma4_12b_tenth(global_head_dim: int = 48, max_positions: int = 16384) -> Gemma4UnifiedConfig:
    config = tiny_gemma4_config(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=16,
                                num_key_value_heads=8, head_dim=24, sliding_window=128).to_dict()
    text = {k: v for k, v in config["text_config"].items() if k != "per_layer_config"}
    text.update(global_head_dim=global_head_dim, num_global_key_value_heads=1, attention_k_eq_v=True,
                max_position_embeddings=max_positions)
    return Gemma4UnifiedConfig(**{**config, "text_config": text})


SHAPES = {"gemma4_12b_tenth": gemma4_12b_tenth, "tiny": lambda: preset_config("tiny"),
          "wide_heads": lambda: gemma4_12b_tenth(global_head_dim=512, max_positions=2048)}


def build(config) -> FusionModel:
    torch.manual_seed(0)
    full = Gemma4UnifiedForConditionalGeneration(config).to(torch.bfloat16).eval()
    return FusionModel.from_loaded(split_full_model(full, gemma4_spec(full.config))).eval()


def prompt(model: FusionModel, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeds [1, S, H], block_ids [1, S]) of <bos> <boi> 280 x <image> <eoi> + text, as `embed_inputs` gives them."""
    t = model.tokens
    text = torch.randint(t.pad + 20, t.pad + 200, (tokens - IMAGE_TOKENS - 3,), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([torch.tensor([t.bos, *t.image_start, *[t.image_token] * IMAGE_TOKENS, *t.image_end]), text])[None]
    pixels = torch.randint(0, 256, (1, IMAGE_TOKENS, model.vision.patch_dim), dtype=torch.uint8)
    positions = torch.tensor([(x, y) for y in range(IMAGE_TOKENS // GRID_WIDTH) for x in range(GRID_WIDTH)])[None]
    return model.embed_inputs(ids, pixel_values=pixels, image_position_ids=positions,
                              mm_token_type_ids=(ids == t.image_token).long() * IMAGE)


def _events(nodes):
    for node in nodes:
        yield node
        yield from _events(node.children)


def _allocating_ops(node) -> list[str]:
    names, op = [], node.parent
    while op is not None:
        names.append(op.name)
        op = op.parent
    return names  # innermost first: aten::empty, aten::_scaled_dot_product_flash_attention_for_cpu, ...


def allocated_peak(fn) -> dict:
    """The peak bytes allocated while `fn` runs, above what was allocated when it started: `peak_bytes`; the peak of
    everything but the attention kernels' own buffers (their scratch, not their outputs), taken at every allocation
    with the scratch live at that moment subtracted: `peak_without_scratch_bytes`, what the planner models; the
    largest scratch live at once: `kernel_scratch_bytes`; and `peak_in`, the outermost op allocating at the peak
    without scratch (aten::linear, aten::mul, aten::scaled_dot_product_attention, ...).

    The scratch is subtracted at each moment, not once at the overall peak, because its size is the kernel's choice
    and differs by CPU: on an Intel Xeon with AMX the CPU flash-attention kernel's buffers moved the overall peak of
    the 12B-proportioned shape from the MLP into attention, where the rest is smaller (an AMD EPYC kept it in the MLP).
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocs = sorted((n for n in _events(prof.profiler.kineto_results.experimental_event_tree())
                     if n.tag == _EventType.Allocation), key=lambda n: n.start_time_ns)
    start = allocs[0].extra_fields.total_allocated - allocs[0].extra_fields.alloc_size
    live: dict[int, int] = {}  # address -> bytes of the attention kernels' own buffers now allocated
    peak = rest_peak = scratch_peak = scratch = 0  # scratch: sum(live.values()), kept as it changes
    rest_at = allocs[0]
    for node in allocs:
        fields, ops = node.extra_fields, _allocating_ops(node)
        if fields.alloc_size < 0:
            scratch -= live.pop(fields.ptr, 0)
        elif ops[:1] == ["aten::empty"] and ops[1:2] and ops[1].startswith("aten::_scaled_dot_product"):
            live[fields.ptr] = fields.alloc_size
            scratch += fields.alloc_size
        total = fields.total_allocated - start
        peak, scratch_peak = max(peak, total), max(scratch_peak, scratch)
        if total - scratch > rest_peak:
            rest_peak, rest_at = total - scratch, node
    outer = [name for name in _allocating_ops(rest_at) if name.startswith("aten::")]
    return dict(peak_bytes=peak, peak_without_scratch_bytes=rest_peak, kernel_scratch_bytes=scratch_peak,
                peak_in=outer[-1] if outer else "?")


@torch.no_grad()
def measure(model: FusionModel, tokens: int) -> dict:
    """`allocated_peak` of one prefill of `tokens` tokens (CachedDecoder.start for one unpadded row, after embedding)."""
    embeds, block_ids = prompt(model, tokens)
    backbone = model.backbone

    def prefill():
        cache = DynamicCache(config=backbone.text_config)
        hidden = backbone(embeds, torch.ones(1, tokens, dtype=torch.long), torch.arange(tokens)[None], block_ids,
                          cache=cache)
        return backbone.logits(hidden[:, -1])

    return allocated_peak(prefill)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    args = parser.parse_args()
    results = {}
    for name in args.shapes:
        config = SHAPES[name]()
        model, planner = build(config), MemoryPlanner(config, "bf16")
        text = config.get_text_config()
        points = []
        for tokens in args.lengths:
            if tokens > text.max_position_embeddings:
                continue
            point = measure(model, tokens)
            kv = planner.kv_cache_bytes(tokens)
            measured = point["peak_without_scratch_bytes"] - kv
            planned = planner.activation_bytes(tokens)
            points.append(dict(tokens=tokens, **point, kv_cache_bytes=kv, measured_activation_bytes=measured,
                               planned_activation_bytes=planned, ratio=round(planned / measured, 3),
                               ratio_with_scratch=round(planned / (point["peak_bytes"] - kv), 3)))
        results[name] = dict(hidden=text.hidden_size, layers=text.num_hidden_layers, window=text.sliding_window,
                             points=points)
    ratios = [p["ratio"] for r in results.values() for p in r["points"]]
    print(json.dumps({
        "ratio_min": min(ratios), "ratio_max": max(ratios), "target": TARGET,
        "within_target": all(TARGET[0] <= r <= TARGET[1] for r in ratios), "shapes": results,
        "dtype": "bfloat16", "image_tokens": IMAGE_TOKENS, "threads": torch.get_num_threads(),
        "environment": environment(), "date": datetime.date.today().isoformat(),
    }))


if __name__ == "__main__":
    main()
