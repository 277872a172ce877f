"""The typed config schemas (gemma_fusion/core/schema.py): every group option composes onto its schema, a wrong
type, a wrong null or an out-of-range value stops with one sentence, the range rules are the schema's own, the
loader takes the data config object, and a projector argument nobody can fill is an error, not a class default."""
from __future__ import annotations

import copy
import dataclasses
import shutil
import typing
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf, open_dict

from gemma_fusion.core import schema
from gemma_fusion.core.batch import AUDIO, IGNORE_INDEX, IMAGE
from gemma_fusion.core.config import CONFIG_DIR, check_cli_overrides, check_values
from gemma_fusion.core.errors import UserError
from gemma_fusion.core.schema import DataConfig, EvalConfig, TrainConfig, data_config

CLOSED = {"data": DataConfig, "optim": schema.OptimConfig, "lora": schema.LoraConfig,
          "logger": schema.LoggerConfig, "checkpoint": schema.CheckpointConfig, "distill": schema.DistillConfig}
OPEN = {"backbone": schema.BackboneConfig, "trainer": schema.TrainerConfig}
OPTIONS = [(group, path.stem) for group in (*CLOSED, *OPEN, "experiment", "model/vision", "model/audio")
           for path in sorted((Path(CONFIG_DIR) / group).glob("*.yaml"))]
# the keys the hand-written range table checked before the schemas (gemma_fusion/core/config.py, _NUMBER_RULES)
FORMER_RULES = {
    "data.batch_size", "data.eval_batch_size", "data.image_tokens", "data.num_workers", "data.shuffle_buffer",
    "data.bucket_batches", "data.pack_length", "data.max_batch_tokens", "data.max_length", "data.max_train_shards",
    "data.cache_gb", "data.audio_max_seconds", "data.max_bad_fraction", "data.bad_check_after",
    "data.max_image_megapixels", "optim.warmup_steps", "optim.schedule_steps", "optim.weight_decay",
    "optim.max_nonfinite_skips", "optim.lr", "lora.r", "checkpoint.every_n_steps", "trainer.max_steps"}


def _compose(*overrides: str, name: str = "train", config_dir: str = CONFIG_DIR):
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        return compose(name, overrides=list(overrides))


def _field_names(kind: type) -> set[str]:
    return {f.name for f in dataclasses.fields(kind)}


@pytest.mark.parametrize("group, option", OPTIONS)
def test_every_group_option_composes_onto_its_schema(group, option):
    cfg = _compose(f"{group}={option}")
    assert OmegaConf.get_type(cfg) is TrainConfig
    for name, kind in CLOSED.items():  # typed by Hydra: a key the schema lacks would not have composed
        assert OmegaConf.get_type(cfg[name]) is kind
    for name, kind in OPEN.items():  # open dicts, but every key an option writes is one the schema declares
        assert set(cfg[name]) <= _field_names(kind), f"{name}: {set(cfg[name]) - _field_names(kind)}"
    check_values(cfg)


def test_eval_yaml_composes_onto_its_schema():
    cfg = _compose("run=somewhere", name="eval")
    assert OmegaConf.get_type(cfg) is EvalConfig and cfg.max_new_tokens == 16 and cfg.data.batch_size is None
    check_values(cfg)
    with pytest.raises(UserError, match=r"^max_new_tokens=0 is out of range: it must be an integer >= 1\.$"):
        check_values(_compose("run=somewhere", "max_new_tokens=0", name="eval"))


def test_a_key_an_option_leaves_out_takes_the_schema_default():
    cfg = _compose("lora=none", "distill=none")
    assert cfg.lora.r == 0 and cfg.lora.merge is False  # lora/none.yaml writes only r
    assert cfg.distill.alpha == schema.DistillConfig.alpha and cfg.distill.teacher is None
    assert cfg.model.require_init_from is False  # only experiment=finetune sets it
    assert _compose("experiment=finetune").model.require_init_from is True


def test_every_override_style_still_composes():
    assert "pretrain" not in _compose("~backbone.pretrain").backbone  # an open group: keys may be deleted
    cfg = _compose("+trainer.max_epochs=2", "+model.vision.out_dim=32", "+data.extra=1", "+optim.lr.extra=0.5",
                   "backbone=path", "backbone.path=/models/x", "data=shards", "data.train=/a", "data.val=/b",
                   "data.max_train_shards=4")
    assert cfg.trainer.max_epochs == 2 and cfg.model.vision.out_dim == 32 and cfg.data.max_train_shards == 4
    assert _compose("+backbone.trust_remote_code=true").backbone.trust_remote_code is True  # tiny.yaml lacks it
    assert _compose("experiment=distill", "distill.teacher=/runs/t").model.init_from == "/runs/t"  # ${distill.teacher}
    for job in (["backbone=tiny_s", "data.max_train_shards=4", "seed=1"], ["model/audio=conv1d", "seed=0"]):
        check_values(_compose("experiment=scaling", *job))  # what a multirun sweep's jobs compose
    check_cli_overrides("train", ["data.max_train_shards=4,32", "seed=0,1"])  # sweep values are each job's


@pytest.mark.parametrize("override, sentence", [
    ("data.batch_size=abc", "error: data.batch_size=abc is not an integer (its default is 32)."),
    ("data.max_batch_tokens=abc", "error: data.max_batch_tokens=abc is not an integer (its default is null)."),
    ("data.cache_gb=lots", "error: data.cache_gb=lots is not a number"),
    ("data.batch_size=null", "error: data.batch_size=null is not allowed: it must be an integer (its default is 32)."),
    ("data.batch_sise=4", "error: unknown config option 'data.batch_sise'; valid keys under data: allow_pipe,"),
])
def test_a_wrong_override_is_one_sentence_at_start_up(override, sentence):
    with pytest.raises(SystemExit, match=f"^{sentence}".replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        check_cli_overrides("train", [override])
    with pytest.raises(ConfigCompositionException):  # and Hydra, typed by the schema, refuses it as well
        _compose(override)


def test_a_nullable_key_takes_null():
    check_cli_overrides("train", ["data.max_length=null", "optim.schedule_steps=null"])
    cfg = _compose("data.max_length=null", "optim.schedule_steps=null")
    check_values(cfg)
    assert cfg.data.max_length is None and data_config(cfg.data).max_length is None


def test_a_wrong_type_in_a_yaml_stops_at_composition(tmp_path):
    configs = Path(shutil.copytree(CONFIG_DIR, tmp_path / "configs"))
    (configs / "experiment" / "typo.yaml").write_text("# @package _global_\ndata:\n  batch_size: abc\n")
    (configs / "experiment" / "nulls.yaml").write_text("# @package _global_\noptim:\n  warmup_steps: null\n")
    (configs / "backbone" / "odd.yaml").write_text("path: /models/x\ndtype: bfloat16\nquant_group_size: big\n")
    with pytest.raises(ConfigCompositionException, match="experiment/typo"):
        _compose("experiment=typo", config_dir=str(configs))
    with pytest.raises(ConfigCompositionException, match="experiment/nulls"):
        _compose("experiment=nulls", config_dir=str(configs))
    cfg = _compose("backbone=odd", config_dir=str(configs))  # an open group: its keys are checked at start-up
    with pytest.raises(UserError, match=r"^backbone\.quant_group_size=big is not an integer\.$"):
        check_values(cfg)


@pytest.mark.parametrize("override, message", [
    ("data.batch_size=0", "data.batch_size=0 is out of range: it must be an integer >= 1."),
    ("data.max_bad_fraction=2", "data.max_bad_fraction=2 is out of range: it must be a number from 0 to 1."),
    ("optim.lr.audio=-1", "optim.lr.audio=-1 is out of range: it must be a number >= 0 (0 freezes that part)."),
    ("compute.match=steps", "compute.match=steps is out of range: it must be one of none, flops, tokens."),
    ("trainer.max_steps=null", "trainer.max_steps is null; it must be an integer."),  # an open group's null
])
def test_a_value_out_of_range_is_one_sentence(override, message):
    with pytest.raises(UserError, match="^" + message.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")
                       + "$"):
        check_values(_compose(override))


def _violation(kind: type, key: str, test):
    """A value of the key's type (read from the schema) that its rule refuses."""
    for part in key.split("."):
        field = {f.name: f for f in dataclasses.fields(kind)}[part]
        hint = typing.get_type_hints(kind)[part]
        kind = field.metadata.get("schema") or hint
    if typing.get_origin(hint) is dict:  # a rule on each value (optim.lr.<part>)
        hint = typing.get_args(hint)[1]
    candidates = ["nope"] if str in (hint, *typing.get_args(hint)) else [-5, -1, 0, 1.5, 2]
    return next(value for value in candidates if not test(value))


@pytest.mark.parametrize("config_name, kind", [("train", TrainConfig), ("eval", EvalConfig)])
def test_every_rule_of_the_schema_is_checked(config_name, kind):
    found = schema.rules(kind)
    if kind is TrainConfig:
        assert FORMER_RULES <= set(found)
    base = _compose(*(["run=x"] if config_name == "eval" else []), name=config_name)
    for key, (test, must) in found.items():
        cfg = copy.deepcopy(base)
        value = _violation(kind, key, test)
        shown = f"{key}.vision" if key == "optim.lr" else key
        with open_dict(cfg):
            OmegaConf.update(cfg, shown, value, force_add=True)
        shown_value = str(value if isinstance(value, str) else OmegaConf.select(cfg, shown)).removesuffix(".0")
        expected = f"{shown}={shown_value} is out of range: it must be {must}."
        with pytest.raises(UserError) as err:
            check_values(cfg)
        assert str(err.value) == expected


def test_the_rules_are_read_from_the_schema(monkeypatch):
    from gemma_fusion.data.pipeline import make_loader

    cfg = _compose("data.batch_size=32")
    check_values(cfg)
    field = DataConfig.__dataclass_fields__["batch_size"]
    monkeypatch.setattr(field, "metadata", schema.rule(lambda v: v >= 64, "at least 64 (a test's rule)"))
    with pytest.raises(UserError, match=r"^data\.batch_size=32 is out of range: it must be at least 64 \(a test's"):
        check_values(cfg)
    with pytest.raises(UserError, match=r"^data\.batch_size=32 is out of range"):  # the loader asks the same rule
        make_loader(DataConfig(batch_size=32), None, train=True, spec="unused")


def test_data_config_from_a_composed_node_or_an_older_run():
    cfg = _compose("data=shards", "data.train=/d/train", "data.val=/d/val")
    data = data_config(cfg.data)
    assert isinstance(data, DataConfig) and data.train == "/d/train" and data.batch_size == 8 and not data.resampled
    old = {"train": "/d/train", "val": "/d/val", "image_tokens": 280, "batch_size": 8, "eval_batch_size": 16,
           "num_workers": 2, "shuffle_buffer": 1000, "removed_key": 1}  # keys a run of an older version wrote
    data = data_config(OmegaConf.create(old))
    assert data.pack_length == 0 and data.max_bad_fraction == 0.05 and data.max_image_megapixels == 200
    with pytest.raises(UserError, match=r"^data\.batch_size=many is not an integer\.$"):
        data_config({**old, "batch_size": "many"})


# -- the loader takes the data config object ----------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    from gemma_fusion.data.demo import ensure_demo_data

    return ensure_demo_data(tmp_path_factory.mktemp("demo") / "demo", train_per_task=6, val_per_task=2,
                            test_per_task=2, samples_per_shard=8, num_workers=1, progress=False)


def test_make_loader_reads_the_demo_config(tiny_gemma4_dir, demo_dir):
    """The demo's data group (batch 4): training batches of one modality each, stream after stream; evaluation
    reading sees each val sample once. Geometry of the tiny checkpoint: 4-px patches pooled 3 x 3 (432 uint8
    values per soft token, at most data.image_tokens = 8 per image), 320-sample audio frames."""
    from gemma_fusion.data.inspect import preprocessor_from_config
    from gemma_fusion.data.pipeline import make_loader

    cfg = _compose(f"backbone.path={tiny_gemma4_dir}", "backbone.pretrain=null", f"data.train={demo_dir}/train",
                   f"data.val={demo_dir}/val", "data.batch_size=4")
    preprocess = preprocessor_from_config(cfg)
    stream = iter(make_loader(cfg.data, preprocess, train=True, seed=0))
    seen = set()
    for _ in range(8):  # resampled (demo.yaml): the stream does not end after the 18 training samples
        batch = next(stream)
        rows, length = batch["input_ids"].shape
        assert rows == 4 and len(batch["meta"]) == 4 and {"stats", "position"} <= set(batch)
        for key in ("labels", "attention_mask", "mm_token_type_ids"):
            assert batch[key].shape == (4, length)
        assert ((batch["labels"] != IGNORE_INDEX).sum(1) > 0).all()  # every row has target tokens
        modality = {m["modality"] for m in batch["meta"]}
        assert len(modality) == 1
        seen |= modality
        if modality == {"image"}:
            assert set(batch) >= {"pixel_values", "image_position_ids"} and "input_features" not in batch
            images, patches, values = batch["pixel_values"].shape
            assert batch["pixel_values"].dtype == torch.uint8 and images == 4 and patches <= 8
            assert values == (4 * 3) ** 2 * 3 and batch["image_position_ids"].shape == (4, patches, 2)
            valid = (batch["image_position_ids"] != -1).all(-1).sum(1)
            assert torch.equal((batch["mm_token_type_ids"] == IMAGE).sum(1), valid)  # one slot per soft token
        else:
            assert modality == {"audio"} and "pixel_values" not in batch
            clips, frames, samples = batch["input_features"].shape
            assert clips == 4 and samples == 320 and batch["input_features_mask"].shape == (4, frames)
            assert torch.equal((batch["mm_token_type_ids"] == AUDIO).sum(1), batch["input_features_mask"].sum(1))
    assert seen == {"image", "audio"}

    batches = list(make_loader(cfg.data, preprocess, train=False))  # eval_batch_size 64: one batch per modality
    assert sorted(len(b["meta"]) for b in batches) == [2, 4]  # 2 audio (dtmf) and 4 image (ocr_*) samples
    keys = [m["key"] for b in batches for m in b["meta"]]
    assert len(keys) == len(set(keys)) == 6


# -- a projector argument nobody can fill -------------------------------------------------------------------

class _Design:
    def __init__(self, out_dim: int, patch_size: int = 16, posemb_size: int = 64, hidden_dim: int | None = None):
        pass


def test_a_null_the_checkpoint_cannot_fill_is_an_error_not_a_class_default():
    from gemma_fusion.models.projectors.build import filled_nulls

    args = {"patch_size": None, "posemb_size": None, "hidden_dim": None, "typo": None}
    gemma = {"patch_size": 16, "posemb_size": 1120, "eps": 1e-6}  # what a Gemma 4 checkpoint says
    assert filled_nulls(dict(args), gemma, _Design, "vision") == {"patch_size": 16, "posemb_size": 1120,
                                                                  "hidden_dim": None}
    with pytest.raises(UserError, match=r"^model\.vision\.posemb_size is null and the backbone gives no value for it "
                                        r".*; set it, e\.g\. model\.vision\.posemb_size=64 \(the design's own default\)"):
        filled_nulls({"patch_size": 14, "posemb_size": None}, {}, _Design, "vision")
    with pytest.raises(UserError, match=r"^model\.vision\.patch_size, model\.vision\.posemb_size are null .* e\.g\. "
                                        r"model\.vision\.patch_size=16 model\.vision\.posemb_size=64"):
        filled_nulls(dict(args), {}, _Design, "vision")


def test_posemb_size_null_on_a_backbone_without_gemma4_vision_stops(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from gemma_fusion.models.backbone import read_backbone_spec
    from gemma_fusion.models.projectors.build import build_projector
    from gemma_fusion.models.tokenizer import build_byte_tokenizer

    LlamaForCausalLM(LlamaConfig(vocab_size=272, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path / "llama")
    build_byte_tokenizer().save_pretrained(tmp_path / "llama")
    llama = read_backbone_spec(tmp_path / "llama").multimodal.vision
    node = OmegaConf.load(Path(CONFIG_DIR) / "model" / "vision" / "linear.yaml")
    node.patch_size, node.pooling_kernel_size = 16, 3
    with pytest.raises(UserError, match=r"^model\.vision\.posemb_size is null and the backbone gives no value"):
        build_projector(node, 32, llama, None, "vision")
    node.posemb_size = 64
    assert build_projector(node, 32, llama, None, "vision").posemb.table.shape[0] == 64
