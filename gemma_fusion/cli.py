"""Every `python -m gemma_fusion.X` command and the dataclass that is its options' schema.

All of them parse their command line with `gemma_fusion.core.cli.parse_cli` (the parser lives in core/ so
the data and training commands below this layer can use it too): `key=value` in Hydra's override
grammar, `--key value`, `--flag`, declared positionals, and `--help` listing every key with its type,
default and help. `train.py` and `eval.py` are Hydra apps over `configs/` and are not listed here.
"""
from __future__ import annotations

COMMANDS = {  # module run with `python -m` -> the name of its schema in that module
    "gemma_fusion.export": "ExportOptions",
    "gemma_fusion.infer": "InferOptions",
    "gemma_fusion.plan": "PlanOptions",
    "gemma_fusion.report": "ReportOptions",
    "gemma_fusion.data.write_shards": "WriteShardsOptions",
    "gemma_fusion.data.inspect": "InspectOptions",
    "gemma_fusion.data.demo": "DemoOptions",
    "gemma_fusion.training.pretrain_text": "PretrainOptions",
}
