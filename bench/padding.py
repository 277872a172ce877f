"""Padding in the demo mix's batches: naive batching against packing (and length bucketing), as a fraction of tokens.

    python bench/padding.py [--data data/demo/train] [--batches 60] [--batch-size 32] [--pack-length 512]

Reads the demo's training shards (generated under a temporary directory, 1,000 samples per task, when
`--data` does not exist) through the real loader (`make_loader`, one modality per batch, the demo's
preprocessing: 8-token images, 640-sample audio frames, the byte tokenizer) and counts, over the same
`--batches` batches of each way of batching,

    padding fraction = 1 - real tokens / (rows x padded length)

- unpacked: the demo's batching (32 samples per batch, padded to the longest);
- bucketed: `bucket_batches=8` (samples sorted by length within 8 batches' worth);
- packed: `pack_length=L` (first-fit decreasing into rows of at most L tokens, attention kept per sample),
  batches of `--batch-size` rows.

Prints one JSON line with `padding_fraction_unpacked` and `padding_fraction_packed` (target <= 0.05).
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch


def preprocessor(tmp: Path):
    """The demo's per-sample preprocessing, from a random tiny Gemma 4 (same geometry and tokenizer as the demo's)."""
    from transformers import Gemma4UnifiedForConditionalGeneration

    from gemma_fusion.data.pipeline import preprocessor_for
    from gemma_fusion.models.fusion import FusionModel
    from gemma_fusion.models.tiny import tiny_gemma4_config
    from gemma_fusion.models.tokenizer import build_byte_tokenizer

    Gemma4UnifiedForConditionalGeneration(tiny_gemma4_config()).save_pretrained(tmp / "backbone")
    build_byte_tokenizer().save_pretrained(tmp / "backbone")
    model = FusionModel.from_pretrained(tmp / "backbone")
    return preprocessor_for(model, image_tokens=8, audio_max_seconds=30), model.tokens.pad


def padding(loader, batches: int) -> dict:
    real = total = rows = 0
    start = time.perf_counter()
    for batch in itertools.islice(loader, batches):
        mask = batch["attention_mask"]
        real, total, rows = real + int(mask.sum()), total + mask.numel(), rows + mask.shape[0]
    return {"padding_fraction": round(1 - real / total, 4), "real_tokens": real, "slots": total, "rows": rows,
            "seconds": round(time.perf_counter() - start, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data/demo/train")
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pack-length", type=int, default=512)
    args = parser.parse_args()

    from gemma_fusion.data.demo import ensure_demo_data
    from gemma_fusion.core.schema import DataConfig
    from gemma_fusion.data.pipeline import make_loader

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = Path(args.data)
        if not data.is_dir():
            data = ensure_demo_data(tmp / "demo", train_per_task=1000, val_per_task=1, test_per_task=1,
                                    progress=False) / "train"
        preprocess, _ = preprocessor(tmp)

        def loader(**batching):
            reading = DataConfig(batch_size=args.batch_size, shuffle_buffer=1000, resampled=True, **batching)
            return make_loader(reading, preprocess, train=True, spec=str(data), seed=0, split_by_rank=False)

        results = {
            "unpacked": padding(loader(), args.batches),
            "bucketed": padding(loader(bucket_batches=8), args.batches),
            "packed": padding(loader(pack_length=args.pack_length), args.batches),
        }
    print(json.dumps({
        "padding_fraction_unpacked": results["unpacked"]["padding_fraction"],
        "padding_fraction_bucketed": results["bucketed"]["padding_fraction"],
        "padding_fraction_packed": results["packed"]["padding_fraction"],
        "target_packed": 0.05, "pack_length": args.pack_length, "batch_size": args.batch_size,
        "batches": args.batches, "data": str(args.data), "details": results,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "date": datetime.date.today().isoformat(),
    }))


if __name__ == "__main__":
    main()
