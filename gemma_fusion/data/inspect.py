"""Run shards through the exact training preprocessing and batching, and report what training would see.

    python -m gemma_fusion.data.inspect SPEC [--json] [--limit N] [train.yaml overrides ...]

    python -m gemma_fusion.data.inspect /data/train --json backbone=path backbone.path=/models/gemma-4-12b-it \\
        data=shards data.image_tokens=280 data.pack_length=4096

SPEC is anything `data.train` takes (a directory, glob, brace pattern, URL). The overrides compose
`configs/train.yaml` exactly as `train.py` does, so the tokenizer, image budget, frame length, maximum
length and batching (bucketing, packing, token budget) are the run's. Only the backbone's config and
tokenizer are read, never its weights. Reports samples ok, samples skipped by reason, the
distribution of text / image / audio tokens per sample, and the padding fraction of the batches; with
`--json` the last line is one JSON object (`samples_ok`, `samples_skipped`, `tokens`, `padding_fraction`, ...).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from tqdm import tqdm

from gemma_fusion.core.cli import option, parse_cli
from gemma_fusion.core.config import CONFIG_DIR, check_cli_overrides
from gemma_fusion.core.errors import UserError, exit_on_user_error
from gemma_fusion.core.batch import AUDIO, IMAGE, TEXT
from gemma_fusion.core.schema import data_config
from gemma_fusion.data.audio import AudioPreprocessor
from gemma_fusion.data.image import ImagePreprocessor
from gemma_fusion.data.pipeline import SamplePreprocessor
from gemma_fusion.models.backbone import read_backbone_spec
from gemma_fusion.data.pipeline import make_loader

KINDS = {"text": TEXT, "image": IMAGE, "audio": AUDIO}  # mm_token_type_ids values


def preprocessor_from_config(cfg):
    """The run's SamplePreprocessor, built from the backbone's config and tokenizer only (no weights)."""
    spec = read_backbone_spec(cfg.backbone.path)

    def setting(node, key: str, from_checkpoint: dict, default):
        value = node.get(key) if node is not None else None
        return value if value is not None else from_checkpoint.get(key, default)

    vision, audio, data = cfg.model.get("vision"), cfg.model.get("audio"), data_config(cfg.data)
    image = audio_pre = None
    if vision is not None and "_target_" in vision:
        image = ImagePreprocessor(data.image_tokens, setting(vision, "patch_size", spec.multimodal.vision, 16),
                                  setting(vision, "pooling_kernel_size", spec.multimodal.vision, 3),
                                  data.jpeg_draft, data.max_image_megapixels)
    if audio is not None and "_target_" in audio:
        audio_pre = AudioPreprocessor(samples_per_token=setting(audio, "frame_dim", spec.multimodal.audio, 640),
                                      max_seconds=data.audio_max_seconds)
    return SamplePreprocessor(spec.tokenizer, spec.tokens, image, audio_pre, data.max_length)


def _distribution(values: list[int]) -> dict:
    if not values:
        return {"total": 0, "mean": 0.0, "min": 0, "p50": 0, "p90": 0, "max": 0}
    ordered = sorted(values)
    def pick(q):
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
    return {"total": sum(ordered), "mean": round(sum(ordered) / len(ordered), 2), "min": ordered[0],
            "p50": pick(0.5), "p90": pick(0.9), "max": ordered[-1]}


def inspect_shards(spec, cfg, limit: int | None = None, progress: bool = True) -> dict:
    """Iterate `spec` once with the run's preprocessing and batching; returns the report dict."""
    # training's batching (bucketing, packing, token budget), each sample once, in order, every bad one counted
    data = replace(data_config(cfg.data), num_workers=0, shuffle_buffer=0, resampled=False, cache_gb=0.0,
                   max_train_shards=None, max_bad_fraction=1.0)
    loader = make_loader(data, preprocessor_from_config(cfg), train=True, spec=spec, seed=cfg.seed)
    per_kind: dict[str, list[int]] = {kind: [] for kind in KINDS}
    tasks: dict[str, int] = {}
    real = slots = batches = 0
    for batch in tqdm(loader, desc="inspecting", unit="batch", disable=not progress):
        batches += 1
        mask = batch["attention_mask"].bool()
        real, slots = real + int(mask.sum()), slots + mask.numel()
        segments = batch.get("segment_ids", mask.long())
        types = batch["mm_token_type_ids"]
        for row in range(mask.shape[0]):
            for number in segments[row][mask[row]].unique().tolist():
                in_sample = (segments[row] == number) & mask[row]
                for kind, code in KINDS.items():
                    per_kind[kind].append(int((types[row][in_sample] == code).sum()))
        for m in batch["meta"]:
            tasks[m["task"]] = tasks.get(m["task"], 0) + 1
        if limit and len(per_kind["text"]) >= limit:
            break
    stats = loader.dataset.stats
    return {
        "spec": spec if isinstance(spec, str) else json.loads(json.dumps(spec, default=str)),
        "samples_ok": stats.ok,
        "samples_skipped": dict(stats.skipped),
        "tasks": dict(sorted(tasks.items())),
        "tokens": {kind: _distribution(values) for kind, values in per_kind.items()},
        "batches": batches,
        "padding_fraction": round(1 - real / slots, 4) if slots else 0.0,
        "batching": {"batch_size": data.batch_size, "bucket_batches": data.bucket_batches,
                     "pack_length": data.pack_length, "max_batch_tokens": data.max_batch_tokens},
    }


def print_report(report: dict) -> None:
    skipped = report["samples_skipped"]
    print(f"samples ok: {report['samples_ok']}   skipped: {sum(skipped.values())}"
          + (f" ({', '.join(f'{r}: {n}' for r, n in sorted(skipped.items()))})" if skipped else ""))
    print(f"tasks: {report['tasks']}")
    print(f"{'tokens/sample':<14} {'mean':>8} {'min':>6} {'p50':>6} {'p90':>6} {'max':>6} {'total':>10}")
    for kind, d in report["tokens"].items():
        print(f"{kind:<14} {d['mean']:>8} {d['min']:>6} {d['p50']:>6} {d['p90']:>6} {d['max']:>6} {d['total']:>10}")
    print(f"batches: {report['batches']}   padding fraction: {report['padding_fraction']:.4f}   ({report['batching']})")


@dataclass
class InspectOptions:
    """Run shards through the exact training preprocessing and batching; report what training would see."""

    spec: str = option(help="shards: a directory, glob, brace pattern or URL (anything data.train takes)",
                       positional=True, metavar="SPEC")
    json: bool = option(False, "end with one JSON line")
    limit: int | None = option(None, "stop after about this many samples (null: all)")
    overrides: list[str] = option(help="train.yaml overrides, e.g. data.image_tokens=280 (as train.py takes them)",
                                  rest=True, metavar="train.yaml overrides")


def main(argv: list[str] | None = None) -> dict:
    args = parse_cli(InspectOptions, argv, prog="python -m gemma_fusion.data.inspect")

    def run() -> dict:
        check_cli_overrides("train", args.overrides)
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("train", overrides=args.overrides)
        if cfg.backbone.get("pretrain") and not (cfg.backbone.path and _exists(cfg.backbone.path)):
            raise UserError(f"The demo backbone {cfg.backbone.path} is not prepared yet; run `python train.py` once "
                            "or pass backbone=path backbone.path=DIR.")
        report = inspect_shards(args.spec, cfg, args.limit, progress=sys.stderr.isatty())
        print_report(report)
        if args.json:
            print(json.dumps(report))
        return report

    return exit_on_user_error(run)


def _exists(path) -> bool:
    return (Path(path) / "config.json").is_file()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
