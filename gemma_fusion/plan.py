"""Memory planner entry point: `python -m gemma_fusion.plan backbone=gemma4_12b quant=int4 gpu_gb=16 ... [--json]`
(`--help` lists every key; the planner and what it counts: gemma_fusion/inference/plan.py)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import partial

from gemma_fusion.core.cli import call_or_exit, option, parse_cli
from gemma_fusion.inference.plan import (GIB, PREFILL_CHUNK, QUANTS, MemoryPlanner, format_plan, load_config,
                                         make_plan)

__all__ = ["GIB", "MemoryPlanner", "PlanOptions", "format_plan", "load_config", "main", "make_plan"]


@dataclass
class PlanOptions:
    """Will a backbone fit on one GPU for inference (batch 1), and how long a context can it hold?
    Which figures are exact and which are estimates: gemma_fusion/inference/plan.py."""

    backbone: str = option("gemma4_12b", "a preset (gemma4_12b, tiny, tiny_s, tiny_m) or a checkpoint directory")
    quant: str = option("bf16", "the decoder's weights", choices=QUANTS)
    gpu_gb: float = option(16.0, "the GPU's memory, read as GiB", gt=0)
    context: int = option(8192, "text tokens", ge=0)
    image_tokens: int = option(0, "soft tokens of the image (2 markers are added)", ge=0)
    audio_seconds: float = option(0.0, "seconds of audio", ge=0)
    quant_group_size: int = option(64, "int4: inputs per scale", gt=0,
                                   rule=(lambda v: v % 2 == 0, "even: int4 packs two values per byte"))
    prefill_chunk: int = option(PREFILL_CHUNK, "tokens per prefill step; 0 = the whole prompt in one pass", ge=0)
    json: bool = option(False, "end with the plan as one JSON line")


def main(argv: list[str] | None = None) -> dict:
    opts = parse_cli(PlanOptions, argv, prog="python -m gemma_fusion.plan")
    settings = {k: v for k, v in asdict(opts).items() if k != "json"}
    plan = call_or_exit(partial(make_plan, **settings), status=2)
    print(format_plan(plan))
    if opts.json:
        print(json.dumps({k: v for k, v in plan.items() if k != "kv_layers"}))
    return plan


if __name__ == "__main__":
    main()
