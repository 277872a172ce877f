"""Memory planner entry point: `python -m gemma_fusion.plan backbone=gemma4_12b quant=int4 gpu_gb=16 ...`
(the planner and what it counts: gemma_fusion/inference/plan.py)."""
from gemma_fusion.inference.plan import GIB, MemoryPlanner, format_plan, load_config, main, make_plan

__all__ = ["GIB", "MemoryPlanner", "format_plan", "load_config", "main", "make_plan"]

if __name__ == "__main__":
    main()
