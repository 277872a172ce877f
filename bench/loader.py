"""Image loader throughput: our shard -> batch pipeline vs transformers' processor vs a bare decode + resize loop.

    python bench/loader.py [--images 200] [--repeats 3] [--min-size 640x480] [--max-size 1024x768]

Generates photo-like JPEGs (quality 90, sizes drawn between --min-size and --max-size) into webdataset
shards in a temporary directory, then times, single process and single thread, samples/s over the same shards:

- pipeline: `make_loader(DataConfig(batch_size=8), ...)` with `SamplePreprocessor(ImagePreprocessor(280))`:
  tar reading, decode, resize + patchify, tokenize, collate — the training path.
- hf_processor: tar reading + PIL decode + transformers' `Gemma4UnifiedImageProcessor`, one image per call,
  float32 out (its defaults).
- hf_processor_batched: the same processor called the fastest way a user would: one call per batch of 8 PIL
  images, `do_rescale=False`, so it returns uint8 pixels as the pipeline does (the model rescales them).
  Passing numpy arrays or CHW uint8 tensors instead of PIL images measured within noise of it.
- bare: tar reading + PIL decode + `Image.resize(target_size, BICUBIC)` in uint8.
- bare_torch: tar reading + PIL decode + the pipeline's own resize kernel (torch's antialiased bicubic on a
  channels-last uint8 view, `gemma_fusion.data.image`): the work no pipeline with these pixels can skip.
- pipeline_draft: the pipeline with `ImagePreprocessor(280, jpeg_draft=True)` (opt-in, not pixel-identical;
  it only shrinks photos over 4x the target's ~645k pixels, so at the default sizes it equals the pipeline).

A warm-up pass on separate shards is excluded; each measurement is the best of `--repeats` passes, run
round-robin so drifting load on shared cores hits all of them alike. Prints one JSON line: the rates, the
ratios against the first comparisons (`pipeline_vs_hf`, `pipeline_vs_bare`: per-image float32 processor calls,
Pillow's resize) and the like-for-like ones (`pipeline_vs_hf_batched`, `pipeline_vs_bare_torch`).
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image, ImageDraw, ImageFilter
from transformers import Gemma4UnifiedForConditionalGeneration
from transformers.models.gemma4_unified.image_processing_gemma4_unified import Gemma4UnifiedImageProcessor
from transformers.utils import logging as hf_logging

from gemma_fusion.artifacts.rundir import environment
from gemma_fusion.core.schema import DataConfig
from gemma_fusion.data.image import ImagePreprocessor, target_size
from gemma_fusion.data.pipeline import SamplePreprocessor, make_loader
from gemma_fusion.data.sources import ShardStream
from gemma_fusion.models.backbone import read_backbone_spec
from gemma_fusion.models.tiny import tiny_gemma4_config
from gemma_fusion.models.tokenizer import build_byte_tokenizer

MAX_SOFT_TOKENS = 280
BATCH_SIZE = 8


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour gradients + soft-edged shapes + fine texture + sensor-like noise.

    Mean JPEG size at quality 90 is ~1.5 bits per pixel (~120 kB), in the range of real photos.
    """
    coarse = rng.integers(0, 256, (rng.integers(3, 7), rng.integers(3, 7), 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(8, 24)):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        w, h = rng.integers(width // 30, width // 3), rng.integers(height // 30, height // 3)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = (draw.ellipse, draw.rectangle)[rng.integers(0, 2)]
        shape((x0, y0, x0 + w, y0 + h), fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.8, 2.0))))
    cell = int(rng.integers(3, 9))  # foliage/fabric-like texture, a few pixels wide
    texture = rng.normal(0, rng.uniform(10, 20), (height // cell + 1, width // cell + 1)).astype(np.float32)
    texture = np.asarray(Image.fromarray(texture, mode="F").resize((width, height), Image.BICUBIC))
    noise = rng.normal(0, rng.uniform(3, 6), (height, width, 3)).astype(np.float32)
    pixels = np.asarray(image, dtype=np.float32) + texture[..., None] + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_shards(out: Path, count: int, per_shard: int, seed: int, min_size: tuple, max_size: tuple) -> dict:
    """`count` samples (`<key>.jpg` + `<key>.json`) in shards of `per_shard`; returns sizes for the report.

    Width and height are drawn independently between `min_size` and `max_size` (width, height)."""
    out.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    jpeg_bytes, pixels = [], []
    for start in range(0, count, per_shard):
        with wds.TarWriter(str(out / f"shard-{start // per_shard:06d}.tar")) as sink:
            for i in range(start, min(start + per_shard, count)):
                width = int(rng.integers(min_size[0], max_size[0] + 1))
                height = int(rng.integers(min_size[1], max_size[1] + 1))
                buffer = io.BytesIO()
                photo_like(rng, width, height).save(buffer, "JPEG", quality=90)
                sink.write({"__key__": f"{i:06d}", "jpg": buffer.getvalue(),
                            "json": json.dumps({"prompt": "Describe:", "target": "a photo"}).encode()})
                jpeg_bytes.append(buffer.tell())
                pixels.append(width * height)
    return dict(jpeg_kb_mean=round(float(np.mean(jpeg_bytes)) / 1024, 1),
                megapixels_mean=round(float(np.mean(pixels)) / 1e6, 3))


def byte_tokenizer_spec(path: Path):
    """Tokenizer + special tokens of the project's tiny byte-tokenizer backbone, saved to `path`."""
    Gemma4UnifiedForConditionalGeneration(tiny_gemma4_config()).save_pretrained(path)
    build_byte_tokenizer().save_pretrained(path)
    return read_backbone_spec(path)


def raw_samples(shards: Path):
    """The pipeline's own tar reading (`ShardStream`, epoch 0, one reader), without preprocessing."""
    urls = sorted(str(p) for p in shards.glob("*.tar"))
    return ShardStream(urls, seed=0, resampled=False, handler=wds.reraise_exception)(0)


def run_pipeline(shards: Path, preprocess: SamplePreprocessor) -> int:
    loader = make_loader(DataConfig(batch_size=BATCH_SIZE, num_workers=0), preprocess, train=True, spec=str(shards))
    count, stats = 0, {}
    for batch in loader:
        assert batch["pixel_values"].dtype == torch.uint8
        count += len(batch["meta"])
        stats = batch["stats"]
    assert not stats.get("skipped"), f"the pipeline skipped samples: {stats}"
    return count


def run_hf(shards: Path, processor: Gemma4UnifiedImageProcessor) -> int:
    count = 0
    for raw in raw_samples(shards):
        image = Image.open(io.BytesIO(raw["jpg"])).convert("RGB")
        processor(image, max_soft_tokens=MAX_SOFT_TOKENS, return_tensors="pt")
        count += 1
    return count


def hf_batch(processor: Gemma4UnifiedImageProcessor, images: list[Image.Image]) -> dict:
    """One call for the whole batch, uint8 out (no rescale): what the pipeline hands the model."""
    return processor(images, max_soft_tokens=MAX_SOFT_TOKENS, do_rescale=False, return_tensors="pt")


def run_hf_batched(shards: Path, processor: Gemma4UnifiedImageProcessor) -> int:
    count, images = 0, []
    for raw in raw_samples(shards):
        images.append(Image.open(io.BytesIO(raw["jpg"])).convert("RGB"))
        if len(images) == BATCH_SIZE:
            count += len(hf_batch(processor, images)["pixel_values"])
            images = []
    if images:
        count += len(hf_batch(processor, images)["pixel_values"])
    return count


def run_bare(shards: Path) -> int:
    count = 0
    for raw in raw_samples(shards):
        image = Image.open(io.BytesIO(raw["jpg"])).convert("RGB")
        height, width = target_size(image.height, image.width, MAX_SOFT_TOKENS)
        image.resize((width, height), Image.BICUBIC)
        count += 1
    return count


def resize_like_pipeline(image: Image.Image) -> torch.Tensor:
    """uint8 [1, C, H, W] (channels-last) at the target size, by the pipeline's kernel and layout."""
    size = target_size(image.height, image.width, MAX_SOFT_TOKENS)
    pixels = torch.from_numpy(np.array(image)).unsqueeze(0).permute(0, 3, 1, 2)  # 1, C, H, W channels-last view
    return F.interpolate(pixels, size=size, mode="bicubic", align_corners=False, antialias=True)


def run_bare_torch(shards: Path) -> int:
    count = 0
    for raw in raw_samples(shards):
        resize_like_pipeline(Image.open(io.BytesIO(raw["jpg"])).convert("RGB"))
        count += 1
    return count


def size(text: str) -> tuple[int, int]:
    width, height = text.lower().split("x")
    return int(width), int(height)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--per-shard", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-size", type=size, default=(640, 480), help="WIDTHxHEIGHT")
    parser.add_argument("--max-size", type=size, default=(1024, 768), help="WIDTHxHEIGHT")
    args = parser.parse_args()
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        tmp = Path(tmp)
        sizes = write_shards(tmp / "shards", args.images, args.per_shard, args.seed, args.min_size, args.max_size)
        write_shards(tmp / "warmup", 8, 8, args.seed + 1, args.min_size, args.max_size)
        spec = byte_tokenizer_spec(tmp / "backbone")
        exact = SamplePreprocessor(spec.tokenizer, spec.tokens, ImagePreprocessor(MAX_SOFT_TOKENS), None)
        draft = SamplePreprocessor(spec.tokenizer, spec.tokens, ImagePreprocessor(MAX_SOFT_TOKENS, jpeg_draft=True),
                                   None)
        processor = Gemma4UnifiedImageProcessor()
        runs = {
            "pipeline": lambda shards: run_pipeline(shards, exact),
            "hf_processor": lambda shards: run_hf(shards, processor),
            "hf_processor_batched": lambda shards: run_hf_batched(shards, processor),
            "bare": run_bare,
            "bare_torch": run_bare_torch,
            "pipeline_draft": lambda shards: run_pipeline(shards, draft),
        }
        for run in runs.values():
            run(tmp / "warmup")
        best = dict.fromkeys(runs, 0.0)
        for _ in range(args.repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                count = run(tmp / "shards")
                seconds = time.perf_counter() - start
                assert count == args.images, f"{name} saw {count} of {args.images} samples"
                best[name] = max(best[name], count / seconds)

    rates = {f"{name}_samples_per_s": round(rate, 1) for name, rate in best.items()}
    print(json.dumps({
        **rates,
        "pipeline_vs_hf": round(best["pipeline"] / best["hf_processor"], 2),
        "pipeline_vs_bare": round(best["pipeline"] / best["bare"], 2),
        "pipeline_draft_vs_bare": round(best["pipeline_draft"] / best["bare"], 2),
        "pipeline_vs_hf_batched": round(best["pipeline"] / best["hf_processor_batched"], 2),
        "pipeline_vs_bare_torch": round(best["pipeline"] / best["bare_torch"], 2),
        "pipeline_draft_vs_bare_torch": round(best["pipeline_draft"] / best["bare_torch"], 2),
        "images": args.images, "min_size": "x".join(map(str, args.min_size)),
        "max_size": "x".join(map(str, args.max_size)),
        **sizes, "jpeg_quality": 90, "max_soft_tokens": MAX_SOFT_TOKENS, "batch_size": BATCH_SIZE,
        "repeats": args.repeats, "threads": torch.get_num_threads(),
        "machine": platform.processor(), "cpu": environment()["cpu"], "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "environment": environment(), "date": datetime.date.today().isoformat(),
    }))


if __name__ == "__main__":
    main()
