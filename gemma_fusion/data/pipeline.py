"""The data path in one line: shards -> decode -> preprocess -> tokenize -> batch.

Shards are webdataset tars. Members are read as raw bytes and decoded only by our own image/audio
code (never pickle). A sample that fails to decode or preprocess is skipped, counted by reason and
logged once per reason; the run goes on.
"""
from __future__ import annotations

import glob
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import webdataset as wds

from gemma_fusion.data.audio import AudioPreprocessor
from gemma_fusion.data.collate import collate, modality
from gemma_fusion.data.image import ImagePreprocessor
from gemma_fusion.data.sequence import build_sequence
from gemma_fusion.errors import UserError

log = logging.getLogger(__name__)
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff", "gif")
AUDIO_EXTS = ("flac", "wav", "mp3", "ogg")
SKIPPED: Counter = Counter()  # reason -> count, per process


def resolve_shards(spec: str | list[str]) -> list[str]:
    """A directory, a glob, a brace pattern, a URL or a list of them -> shard URLs (sorted within a spec)."""
    if isinstance(spec, (list, tuple)):
        return [url for s in spec for url in resolve_shards(s)]
    spec = str(spec)
    if spec.startswith(("http://", "https://")) or "{" in spec:
        return list(wds.shardlists.expand_urls(spec))
    path = Path(spec).expanduser()
    urls = sorted(str(p) for p in path.glob("*.tar")) if path.is_dir() else sorted(glob.glob(str(path)))
    if not urls:
        where = path if path.is_dir() else path.parent
        found = sorted(os.listdir(where))[:10] if where.is_dir() else "the directory does not exist"
        raise UserError(f"The shard pattern '{spec}' matches no .tar files (in {where}: {found}); check data paths.")
    return urls


@dataclass
class SamplePreprocessor:
    """Raw webdataset sample (bytes per member) -> tokenized sample with image patches and audio frames."""

    tokenizer: object
    tokens: object
    image: ImagePreprocessor | None
    audio: AudioPreprocessor | None

    def __call__(self, raw: dict) -> dict:
        meta = json.loads(raw["json"])
        images, clips = [], []
        for ext in IMAGE_EXTS:
            if ext in raw:
                if self.image is None:
                    raise UserError(f"sample {raw['__key__']} has an image but model/vision=none")
                images.append(self.image(raw[ext]))
        for ext in AUDIO_EXTS:
            if ext in raw:
                if self.audio is None:
                    raise UserError(f"sample {raw['__key__']} has audio but model/audio=none")
                frames = self.audio(raw[ext])
                if frames.shape[0] == 0:
                    raise UserError(f"sample {raw['__key__']} has zero-length audio")
                clips.append(frames)
        seq = build_sequence(self.tokenizer, self.tokens, meta.get("prompt", ""), meta.get("target"),
                             [pv.shape[0] for pv, _ in images], [c.shape[0] for c in clips])
        return dict(input_ids=seq.input_ids, labels=seq.labels, mm_token_type_ids=seq.mm_token_type_ids,
                    images=images, audio=clips, key=raw["__key__"], task=meta.get("task", "default"),
                    prompt=meta.get("prompt", ""), target=meta.get("target"))


def skip_and_count(exn: Exception) -> bool:
    """webdataset handler: count the failure by its type, warn on the first of each kind, keep going."""
    reason = type(exn).__name__
    if not SKIPPED[reason]:
        log.warning("skipping a bad sample (%s): %s", reason, exn)
    SKIPPED[reason] += 1
    return True


def batched_by_modality(batch_size: int, pad_id: int):
    """webdataset stage: batches of one modality each, so short image samples never pad to audio length."""
    def stage(samples):
        buckets: dict[str, list] = {}
        for sample in samples:
            bucket = buckets.setdefault(modality(sample), [])
            bucket.append(sample)
            if len(bucket) == batch_size:
                yield collate(bucket, pad_id)
                bucket.clear()
        for bucket in buckets.values():
            if bucket:
                yield collate(bucket, pad_id)
    return stage


def make_loader(
    spec,
    preprocess: SamplePreprocessor,
    batch_size: int,
    num_workers: int = 0,
    shuffle: int = 0,
    seed: int = 0,
    resampled: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader over shards; `resampled=True` streams forever (training), otherwise one pass (eval).

    The stream is a function of `seed` (and the worker index): shards are drawn with a seeded
    generator and the sample shuffle buffer is seeded too, so a rerun sees the same batches.
    """
    urls = resolve_shards(spec)
    if resampled:
        source = [wds.ResampledShards(urls, seed=seed, deterministic=True)]
    else:
        if num_workers > len(urls):
            log.warning("%d shards for %d workers: some workers will get no data", len(urls), num_workers)
        source = [wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker]
    stages = [*source, wds.tarfile_to_samples(handler=skip_and_count)]
    if shuffle:
        stages.append(wds.shuffle(shuffle, seed=seed))
    stages += [wds.map(preprocess, handler=skip_and_count), batched_by_modality(batch_size, preprocess.tokens.pad)]
    return torch.utils.data.DataLoader(wds.DataPipeline(*stages), batch_size=None, num_workers=num_workers,
                                       persistent_workers=num_workers > 0)


def preprocessor_for(model, image_tokens: int, audio_max_seconds: float | None = None) -> SamplePreprocessor:
    """The preprocessing that matches `model`'s projectors (patch size, pooling, frame length)."""
    image = audio = None
    if model.vision is not None:
        image = ImagePreprocessor(image_tokens, model.vision.patch_size, model.vision.pooling_kernel_size)
    if model.audio is not None:
        audio = AudioPreprocessor(samples_per_token=model.audio.frame_dim, max_seconds=audio_max_seconds)
    return SamplePreprocessor(model.tokenizer, model.tokens, image, audio)
