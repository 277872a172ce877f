"""Every check of a training config that needs no model, run before anything is prepared or written.

`check_startup(cfg, run_dir)` is the first thing the recipe does: a mistake on the command line (a key left
`???`, a value out of range, a typo in a shard path, the demo group pointed at your own shards, a missing
`model.init_from` run, bad distillation settings, a `resume=` that is no checkpoint) stops with one sentence
in seconds, before the demo data is generated or the tiny backbone pretrained (minutes) and before the run
directory gets its first file.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from gemma_fusion.models.backbone import check_backbone_dir as check_checkpoint_dir
from gemma_fusion.artifacts.rundir import RunDir
from gemma_fusion.core.config import CONFIG_DIR, check_targets, check_values, to_plain
from gemma_fusion.core.errors import UserError
from gemma_fusion.data.sources import mixture_components, resolve_shards
from gemma_fusion.training.distill import Distiller


@dataclass
class Startup:
    """What the checks found: the distillation teacher side (or None) and the checkpoint to resume (or None)."""

    distiller: Distiller | None
    ckpt_path: str | None


def check_startup(cfg: DictConfig, run_dir: Path) -> Startup:
    """Every model-free check of `cfg`, in the order a user fixes them; raises UserError (one sentence)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:  # e.g. experiment=finetune without model.init_from, data=shards without data.train
        raise UserError(f"{', '.join(missing)} must be set (e.g. {missing[0]}=...): the chosen options leave "
                        f"{'it' if len(missing) == 1 else 'them'} open.")
    check_targets(cfg)  # before anything is imported or built from them
    check_values(cfg)
    check_init_from(cfg.model)
    distiller = build_distiller(cfg)
    ckpt_path = resume_path(cfg, run_dir)  # (a resume= that is not a checkpoint too)
    if cfg.data.get("prepare_demo"):
        check_demo_paths(cfg.data)  # the shards themselves are checked once the demo is generated
    else:
        check_data_paths(cfg.data)
    check_backbone_dir(cfg.backbone)
    return Startup(distiller, ckpt_path)


def check_init_from(model: DictConfig) -> None:
    """A continuing experiment names a finished earlier run in `model.init_from`."""
    init_from = model.get("init_from")
    if model.get("require_init_from") and not init_from:
        raise UserError("this experiment continues an earlier run: pass model.init_from=RUN (e.g. experiment=finetune "
                        "model.init_from=runs/align).")
    earlier = RunDir(init_from) if init_from else None
    if earlier is not None and not earlier.trainable.is_file():
        raise UserError(f"model.init_from={init_from} has no {earlier.trainable.relative_to(earlier.root)}; pass the "
                        "directory of a finished earlier run (its hydra.run.dir).")


def check_backbone_dir(backbone: DictConfig) -> None:
    """`backbone.path` is a checkpoint with a tokenizer (training reads text), unless the project pretrains it there
    (`backbone.pretrain`)."""
    if not backbone.get("pretrain"):
        check_checkpoint_dir(Path(str(backbone.path)).expanduser(), text=True)


def demo_dir() -> Path:
    """Where `data=demo` generates and reads the demo data by default (configs/data/demo.yaml's data.train, one
    level up)."""
    demo = OmegaConf.load(Path(CONFIG_DIR) / "data" / "demo.yaml")
    return Path(to_plain(demo)["train"]).parent


def check_demo_paths(data: DictConfig) -> None:
    """With `data.prepare_demo` (the `data=demo` group) data.train, data.val and data.test (or null) must be
    DIR/train, DIR/val and DIR/test of one directory DIR that the demo generator may write: the default one, one it
    made before (its manifest.json), or a new or empty one (`experiment=smoke`: data/demo_smoke). The generator
    replaces what DIR holds, so shards of your own belong to `data=shards`."""
    train = to_plain(data.train)
    root = Path(train).expanduser().resolve().parent if isinstance(train, str) else None
    ours = root is not None and (root == demo_dir().resolve() or not root.exists()
                                 or (root.is_dir() and not any(root.iterdir())) or (root / "manifest.json").is_file())
    for split in ("train", "val", "test"):
        value = to_plain(data.get(split))
        if split == "test" and value is None:
            continue
        if not (ours and isinstance(value, str) and Path(value).expanduser().resolve() == root / split):
            if split == "test":  # train and val passed: DIR is the demo's
                raise UserError(f"data.test={value} is not the test split of the demo data in {root}: pass "
                                f"data.test={root / 'test'} (or null).")
            raise UserError(f"data.{split}={value} is not the demo's data (data=demo generates DIR/train, DIR/val and "
                            f"DIR/test in a new directory DIR, by default {demo_dir()}): pass data=shards "
                            "data.train=SHARDS data.val=SHARDS for shards of your own.")


def check_data_paths(data: DictConfig) -> None:
    """data.train and data.val name shards that exist (one sentence naming the pattern and what is there)."""
    for split in ("train", "val"):
        try:
            for spec, _ in mixture_components(to_plain(data[split])):
                resolve_shards(spec, data.get("allow_pipe", False))
        except UserError as err:
            raise UserError(f"data.{split}: {err}") from err


def build_distiller(cfg: DictConfig) -> Distiller | None:
    """The distillation loss's teacher side when `distill.teacher` is set (configs/distill/), else None; bad
    settings stop here (the teacher itself loads in the recipe's setup)."""
    node = cfg.get("distill") or {}
    if not node.get("teacher"):
        return None
    return Distiller(str(node.teacher), node.get("alpha", 0.5), node.get("temperature", 2.0), node.get("top_k", 0),
                     node.get("cache"))


def resume_path(cfg: DictConfig, run_dir: Path) -> str | None:
    """`resume=auto` (or `true`): the newest checkpoint under RUN/checkpoints, if any; `resume=PATH`: that file."""
    choice = cfg.get("resume")
    if not choice:
        return None
    if choice is True or choice == "auto":
        newest = RunDir(run_dir).newest_checkpoint()  # (removes the leftovers of saves cut short by a kill)
        return str(newest) if newest else None
    if not Path(choice).is_file():
        raise UserError(f"resume={choice} is not a checkpoint file; pass resume=auto or a .ckpt path from "
                        f"{RunDir(run_dir).checkpoints}.")
    return str(choice)
