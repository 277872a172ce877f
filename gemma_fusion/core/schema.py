"""Typed schemas of the config groups: every key's type, default and allowed range, written once.

configs/train.yaml and configs/eval.yaml name `train_schema` / `eval_schema` first in their defaults lists
(gemma_fusion/core/config.py registers them in Hydra's ConfigStore), so every group option is composed onto
these dataclasses: a key the schema lacks or a value of the wrong type stops at composition, and a key an
option leaves out takes the default written here. The group YAMLs choose values and explain them; the code
reads a composed value and never writes a fallback of its own.

Range rules sit next to their field (`rule(...)` metadata); `check_values` applies them to a composed config,
and `make_loader` to the `DataConfig` it is given. Two groups stay open dicts, checked key by key against
their schema by `check_values` rather than typed by Hydra (`open_group(...)` metadata): `backbone`, whose
`~backbone.pretrain` deletion is a documented override (OmegaConf refuses deletion from a typed node), and
`trainer`, whose keys are any lightning.Trainer arguments (`+trainer.max_epochs=2`). `model.vision` and
`model.audio` are open too: a design's keys are its constructor's argument names (configs/model/*/).
"""
from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from gemma_fusion.core.errors import UserError

_ABSENT = object()


def rule(test: Callable[[Any], bool], must: str) -> dict:
    """Field metadata: a value must pass `test`; `must` completes "it must be ..." in the error. On a dict-valued
    field the rule applies to each value (`optim.lr.vision`). null passes for an Optional field."""
    return {"rule": (test, must)}


def open_group(schema: type) -> dict:
    """Field metadata of a group left an open dict at composition; `schema` lists the keys the project reads."""
    return {"schema": schema}


def _at_least(low, must: str) -> dict:
    return rule(lambda v: v >= low, must)


def _one_of(*choices: str) -> dict:
    return rule(lambda v: v in choices, f"one of {', '.join(choices)}")


# -- the groups ---------------------------------------------------------------------------------------------

@dataclass
class DataConfig:
    """configs/data/*.yaml. The defaults are the plainest reading (each sample once, in order, no loader workers,
    no cache, no packing); demo.yaml and shards.yaml choose their own values."""

    train: Any = None            # shards: a directory, glob, brace pattern, URL, list, or {spec: weight} mixture
    val: Any = None
    test: Any = None             # held-out shards that training never reads (`eval.py data.eval=test`)
    prepare_demo: bool = False   # generate the demo data at `train`'s parent if it is missing
    demo_train_per_task: Any = None  # an int or {task: count}
    demo_val_per_task: Any = None
    demo_test_per_task: Any = None
    image_tokens: int = field(default=280, metadata=_at_least(1, "an integer >= 1 (soft tokens per image)"))
    audio_max_seconds: Optional[float] = field(default=None, metadata=rule(lambda v: v > 0, "null or a number > 0"))
    batch_size: int = field(default=8, metadata=_at_least(1, "an integer >= 1"))
    eval_batch_size: int = field(default=16, metadata=_at_least(1, "an integer >= 1"))
    num_workers: int = field(default=0, metadata=_at_least(0, "an integer >= 0"))
    shuffle_buffer: int = field(default=0, metadata=_at_least(0, "an integer >= 0"))
    bucket_batches: int = field(default=1, metadata=_at_least(1, "an integer >= 1"))
    cache_gb: float = field(default=0.0, metadata=_at_least(0, "a number >= 0"))
    resampled: bool = False      # true: draw shards with replacement forever; false: epochs
    pack_length: int = field(default=0, metadata=_at_least(0, "an integer >= 0 (0: no packing)"))
    max_batch_tokens: Optional[int] = field(default=None, metadata=_at_least(1, "null or an integer >= 1"))
    max_length: Optional[int] = field(default=None, metadata=_at_least(1, "null or an integer >= 1"))
    max_train_shards: Optional[int] = field(default=None, metadata=_at_least(1, "null or an integer >= 1"))
    allow_pipe: bool = False     # permit pipe: shard URLs (they run shell commands)
    max_bad_fraction: float = field(default=0.05, metadata=rule(lambda v: 0 <= v <= 1, "a number from 0 to 1"))
    bad_check_after: int = field(default=200, metadata=_at_least(0, "an integer >= 0"))
    jpeg_draft: bool = False
    max_image_megapixels: float = field(default=200.0, metadata=rule(lambda v: v > 0, "a number > 0"))


@dataclass
class BackboneConfig:
    """configs/backbone/*.yaml (an open group: `~backbone.pretrain` deletes the pretraining recipe)."""

    path: str = MISSING
    dtype: str = "bfloat16"
    attn_implementation: str = "sdpa"
    quant: str = field(default="none", metadata=_one_of("none", "int8", "int4"))
    quant_group_size: int = field(default=64, metadata=_at_least(1, "an integer >= 1"))
    quant_backend: str = field(default="native", metadata=_one_of("native", "torchao"))
    pretrain: Any = None         # keys of gemma_fusion.training.pretrain_text.PretrainConfig
    trust_remote_code: bool = False
    revision: Optional[str] = None


@dataclass
class ModelConfig:
    """train.yaml's `model` node; `vision` / `audio` come from configs/model/{vision,audio}/*.yaml."""

    vision: Any = None           # a projector design: `_target_` + its constructor's arguments; {} for none
    audio: Any = None
    init_from: Optional[str] = None
    require_init_from: bool = False  # experiment=finetune: a run without model.init_from stops at start-up
    gradient_checkpointing: bool = False
    compile: bool = False
    compile_mode: Optional[str] = None
    bidirectional_image: Optional[bool] = None
    bidirectional_audio: bool = True


@dataclass
class LoraConfig:
    """configs/lora/*.yaml."""

    r: Optional[int] = field(default=0, metadata=_at_least(0, "an integer >= 0 (0: no adapters)"))
    alpha: int = 16
    dropout: float = field(default=0.0, metadata=rule(lambda v: 0 <= v < 1, "a number from 0 to below 1"))
    use_dora: bool = False
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    merge: bool = False


@dataclass
class OptimConfig:
    """configs/optim/*.yaml."""

    lr: dict[str, float] = field(default_factory=lambda: {"vision": 1e-2, "audio": 1e-2, "lora": 2e-3, "backbone": 0.0},
                                 metadata=_at_least(0, "a number >= 0 (0 freezes that part)"))
    weight_decay: float = field(default=0.0, metadata=_at_least(0, "a number >= 0"))
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    warmup_steps: int = field(default=100, metadata=_at_least(0, "an integer >= 0"))
    schedule_steps: Optional[int] = field(default=None, metadata=_at_least(1, "null or an integer >= 1"))
    max_nonfinite_skips: int = field(default=0, metadata=_at_least(0, "an integer >= 0"))


@dataclass
class TrainerConfig:
    """configs/trainer/*.yaml (an open group: any lightning.Trainer argument may be added); the defaults are
    Lightning's."""

    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = field(default=1, metadata=_at_least(1, "an integer >= 1"))
    precision: Any = "32-true"
    strategy: Any = "auto"
    max_steps: int = field(default=-1, metadata=rule(lambda v: v >= 1 or v == -1,
                                                     "an integer >= 1 (or -1 with trainer.max_epochs)"))
    max_time: Any = None
    gradient_clip_val: Optional[float] = field(default=None, metadata=_at_least(0, "null or a number >= 0"))
    accumulate_grad_batches: int = field(default=1, metadata=_at_least(1, "an integer >= 1"))
    log_every_n_steps: int = field(default=50, metadata=_at_least(1, "an integer >= 1"))
    enable_progress_bar: bool = True
    deterministic: Any = field(default=None, metadata=rule(lambda v: v is True or v is False or v == "warn",
                                                           "null, true, false or warn"))


@dataclass
class LoggerConfig:
    """configs/logger/*.yaml."""

    csv: bool = True
    wandb: bool = False
    project: str = "gemma_fusion"
    peak_tflops: Optional[float] = field(default=None, metadata=rule(lambda v: v > 0, "null or a number > 0"))


@dataclass
class CheckpointConfig:
    """configs/checkpoint/*.yaml."""

    every_n_steps: int = field(default=0, metadata=_at_least(0, "an integer >= 0 (0: no checkpoints)"))


@dataclass
class DistillConfig:
    """configs/distill/*.yaml (gemma_fusion/training/distill.py)."""

    teacher: Optional[str] = None
    alpha: float = field(default=0.5, metadata=rule(lambda v: 0 <= v <= 1,
                                                    "between 0 (cross-entropy only) and 1 (KL only)"))
    temperature: float = field(default=2.0, metadata=rule(lambda v: v > 0, "a number > 0"))
    top_k: int = field(default=0, metadata=_at_least(0, "an integer >= 0 (0: the whole vocabulary)"))
    cache: Optional[str] = None


@dataclass
class ComputeConfig:
    """train.yaml's `compute` node (RUN/compute.json, compute-matched step counts)."""

    match: str = field(default="none", metadata=_one_of("none", "flops", "tokens"))
    budget: Optional[float] = field(default=None, metadata=rule(lambda v: v > 0, "null or a number > 0"))


@dataclass
class TrainConfig:
    """configs/train.yaml: `python train.py`."""

    backbone: Any = field(default=None, metadata=open_group(BackboneConfig))
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: Any = field(default=None, metadata=open_group(TrainerConfig))
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    seed: int = 0
    resume: Any = None           # null | auto | true | a .ckpt path
    eval_after_train: bool = True


@dataclass
class EvalDataConfig:
    eval: Any = None             # shards to evaluate, or val / test: the run's data.val / data.test; null: val
    batch_size: Optional[int] = field(default=None, metadata=_at_least(1, "null or an integer >= 1"))


@dataclass
class EvalConfig:
    """configs/eval.yaml: `python eval.py`."""

    run: str = MISSING
    compare: list[str] = field(default_factory=list)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    max_new_tokens: int = field(default=16, metadata=_at_least(1, "an integer >= 1"))
    trust_remote_code: bool = False


SCHEMAS = {"train_schema": TrainConfig, "eval_schema": EvalConfig}  # ConfigStore names, as the YAMLs list them


# -- conversion and checks -------------------------------------------------------------------------------------

def data_config(node) -> DataConfig:
    """A `DataConfig` from the composed `cfg.data`, a run's saved `data` node (keys it lacks take the defaults
    above; keys the schema lacks, e.g. added with `+data.x=...`, are left out) or a plain dict."""
    if isinstance(node, DataConfig):
        return node
    if OmegaConf.is_config(node) and OmegaConf.get_type(node) is DataConfig:
        return OmegaConf.to_object(node)
    plain = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    names = {f.name for f in dataclasses.fields(DataConfig)}
    known = {k: v for k, v in plain.items() if k in names}
    check(known, DataConfig, "data")  # one sentence for a wrong type, before OmegaConf's own error
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), known))


def rules(schema: type = TrainConfig, where: str = "") -> dict[str, tuple[Callable[[Any], bool], str]]:
    """Every range rule of `schema`, by dotted key (`data.batch_size` -> (test, what it must be))."""
    found = {}
    for f, kind in _fields(schema):
        key = f"{where}.{f.name}" if where else f.name
        nested = _nested_schema(f, kind)
        if nested is not None:
            found.update(rules(nested, key))
        elif "rule" in f.metadata:
            found[key] = f.metadata["rule"]
    return found


def check(node, schema: type, where: str = "") -> None:
    """Stop with one sentence when a key of `node` (a config node, dict or dataclass instance) that `schema`
    declares holds a value of another type, a null it does not allow, or a value outside its rule."""
    for f, kind in _fields(schema):
        key = f"{where}.{f.name}" if where else f.name
        value = _value(node, f.name)
        if value is _ABSENT:
            continue
        nested = _nested_schema(f, kind)
        if nested is not None:
            if value is not None:
                check(value, nested, key)
            continue
        if value is None:
            if not _nullable(kind):
                raise UserError(f"{key} is null; it must be {_describe(kind)}.")
            continue
        if not _conforms(value, kind):
            raise UserError(f"{key}={_shown(value)} is not {_describe(kind)}.")
        if "rule" in f.metadata:
            test, must = f.metadata["rule"]
            items = value.items() if isinstance(value, (Mapping, DictConfig)) else [(None, value)]
            for part, item in items:
                if not test(item):
                    name = key if part is None else f"{key}.{part}"
                    raise UserError(f"{name}={_shown(item)} is out of range: it must be {must}.")


def schema_of(cfg) -> type:
    """The schema a composed config was merged onto (TrainConfig for a config composed without one)."""
    kind = OmegaConf.get_type(cfg) if OmegaConf.is_config(cfg) else type(cfg)
    return kind if kind in SCHEMAS.values() else TrainConfig


def _fields(schema: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(schema)
    return [(f, hints[f.name]) for f in dataclasses.fields(schema)]


def _nested_schema(f: dataclasses.Field, kind) -> type | None:
    return f.metadata.get("schema") or (kind if dataclasses.is_dataclass(kind) else None)


def _value(node, name: str):
    if dataclasses.is_dataclass(node):
        return getattr(node, name, _ABSENT)
    if isinstance(node, DictConfig):
        if name not in node or OmegaConf.is_missing(node, name):  # (`in` is False for ??? values)
            return _ABSENT
        return node[name]
    return node.get(name, _ABSENT) if isinstance(node, Mapping) else _ABSENT


def _nullable(kind) -> bool:
    return kind is Any or type(None) in typing.get_args(kind)


def _conforms(value, kind) -> bool:
    if kind is Any:
        return True
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) is typing.Union:
        return any(_conforms(value, a) for a in args)
    origin = typing.get_origin(kind) or kind
    if origin is bool:
        return isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, (list, tuple, ListConfig))
    if origin is dict:
        return isinstance(value, (Mapping, DictConfig))
    return True


def _describe(kind) -> str:
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) is typing.Union:
        return "null or " + " or ".join(_describe(a) for a in args)
    origin = typing.get_origin(kind) or kind
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a group of keys"}
    return names.get(origin, "a value")


def _shown(value) -> str:
    """A value as the user most likely wrote it (a float field holds `0` as 0.0)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)
