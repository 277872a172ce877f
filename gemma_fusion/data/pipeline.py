"""The data path: shards -> raw samples -> preprocess -> batches, as one torch DataLoader.

`sources` reads shards (split by node and worker, mixed by weight), `SamplePreprocessor` decodes and
tokenizes one sample with our own image/audio code (never pickle), `batching` forms batches, `state`
keeps the books: a sample that fails is skipped and counted by reason, and the samples trained on are
remembered for exact resume.

Shard sample layout: `<key>.json` (`{"prompt", "target", "task", ...}`) plus media members, either
`<key>.image.<i>.<ext>` / `<key>.audio.<i>.<ext>` (i = 0, 1, ... in order; what `write_shards` writes)
or plain `<key>.<ext>` (one medium; the usual webdataset convention, what the demo writes).
"""
from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from gemma_fusion.data.audio import AudioPreprocessor
from gemma_fusion.data.batching import batch_stage
from gemma_fusion.data.image import MAX_MEGAPIXELS, ImagePreprocessor
from gemma_fusion.data.sequence import build_sequence, encode_text
from gemma_fusion.data.sources import ShardStream, mix, mixture_components, resolve_shards, warn_if_too_few_shards
from gemma_fusion.data.sources import worker_info
from gemma_fusion.data.state import DataStats, StreamState, check_bad_fraction
from gemma_fusion.core.errors import BadSample
from gemma_fusion.core.schema import DataConfig, check, data_config

__all__ = ["IMAGE_EXTS", "AUDIO_EXTS", "SamplePreprocessor", "MemoryCache", "make_loader", "preprocessor_for",
           "run_preprocessor", "resolve_shards"]

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff", "gif")
AUDIO_EXTS = ("flac", "wav", "mp3", "ogg")
_MEDIA_MEMBER = re.compile(r"^(image|audio)\.(\d+)\.(\w+)$")


def media_members(raw: dict) -> tuple[list[bytes], list[bytes]]:
    """(image bytes, audio bytes) of a raw sample, each in member order; other members are ignored."""
    images, audio = [], []
    for name, value in raw.items():
        if name.startswith("__") or name == "json":
            continue
        match = _MEDIA_MEMBER.match(name)
        kind, order, ext = (match[1], int(match[2]), match[3].lower()) if match else (None, 0, name.lower())
        if ext in IMAGE_EXTS and kind in (None, "image"):
            images.append((order, value))
        elif ext in AUDIO_EXTS and kind in (None, "audio"):
            audio.append((order, value))
    return [v for _, v in sorted(images, key=lambda t: t[0])], [v for _, v in sorted(audio, key=lambda t: t[0])]


@dataclass
class SamplePreprocessor:
    """Raw webdataset sample (bytes per member) -> tokenized sample with image patches and audio frames.

    Raises `BadSample` (reasons: missing_json, bad_json, empty_target, no_vision, no_audio, audio_empty,
    too_long, and the decoders' image_undecodable, image_too_large, audio_undecodable).
    `max_length`: samples whose token sequence is longer are skipped (`too_long`), never truncated: a
    cut target would teach the model to stop early. `require_target=False` accepts generation prompts.
    """

    tokenizer: object
    tokens: object
    image: ImagePreprocessor | None
    audio: AudioPreprocessor | None
    max_length: int | None = None
    require_target: bool = True

    def __post_init__(self):
        # Tokenize once here, in the caller's process: a model without a tokenizer (a checkpoint saved without one)
        # stops with its one sentence now, not in a loader worker where it would be counted as a bad sample.
        encode_text(self.tokenizer, "")

    def __call__(self, raw: dict) -> dict:
        where = f"sample {raw.get('__key__')} of {raw.get('__url__')}"
        if "json" not in raw:
            raise BadSample("missing_json", f"{where} has no .json member; every sample needs one with its prompt "
                                            "and target.")
        try:
            meta = json.loads(raw["json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BadSample("bad_json", f"{where}: its .json member is not valid UTF-8 JSON ({err}).") from err
        if not isinstance(meta, dict) or not isinstance(meta.get("prompt", ""), str):
            raise BadSample("bad_json", f"{where}: its .json member must be an object with a string 'prompt'.")
        target = meta.get("target")
        if self.require_target and (not isinstance(target, str) or not target.strip()):
            raise BadSample("empty_target", f"{where} has no target text; training needs a non-empty 'target'.")
        image_bytes, audio_bytes = media_members(raw)
        if image_bytes and self.image is None:
            raise BadSample("no_vision", f"{where} has an image but the model has none (model/vision=none).")
        if audio_bytes and self.audio is None:
            raise BadSample("no_audio", f"{where} has audio but the model has none (model/audio=none).")
        images = [self.image(b) for b in image_bytes]
        clips = [self.audio(b) for b in audio_bytes]
        if any(c.shape[0] == 0 for c in clips):
            raise BadSample("audio_empty", f"{where} has an audio clip with no samples.")
        seq = build_sequence(self.tokenizer, self.tokens, meta.get("prompt", ""), target,
                             [pv.shape[0] for pv, _ in images], [c.shape[0] for c in clips])
        if self.max_length and len(seq.input_ids) > self.max_length:
            raise BadSample("too_long", f"{where} is {len(seq.input_ids)} tokens long, more than "
                                        f"data.max_length={self.max_length}; it is skipped, not truncated.")
        return dict(input_ids=seq.input_ids, labels=seq.labels, mm_token_type_ids=seq.mm_token_type_ids,
                    images=images, audio=clips, key=raw.get("__key__"), task=meta.get("task", "default"),
                    prompt=meta.get("prompt", ""), target=target, url=raw.get("__url__"), index=raw.get("__index__"))


class MemoryCache:
    """Preprocess each distinct sample once and keep the result in RAM, up to `max_gb`.

    For datasets that are read for many epochs and fit in memory (the demo: 32,000 samples, about
    2 GB with pixels kept uint8): later epochs skip decoding, resizing and resampling. Samples are
    keyed by shard URL and sample key; once the budget is spent, further samples are not cached.
    The cache lives in the process that preprocesses: with loader workers, each worker has its own,
    and epoch-based streams restart their workers every epoch (use num_workers=0 or resampled streams).
    """

    def __init__(self, preprocess, max_gb: float):
        self.preprocess, self.max_bytes = preprocess, int(max_gb * 2**30)
        self.store: dict[tuple, dict] = {}
        self.bytes = 0

    def __call__(self, raw: dict) -> dict:
        key = (raw.get("__url__"), raw.get("__key__"))
        sample = self.store.get(key)
        if sample is None:
            sample = self.preprocess(raw)
            size = _nbytes(sample)
            if self.bytes + size <= self.max_bytes:
                self.store[key] = sample
                self.bytes += size
        elif sample.get("index") != raw.get("__index__"):
            sample = {**sample, "index": raw.get("__index__")}
        return sample


def _nbytes(sample: dict) -> int:
    """Approximate resident size of a preprocessed sample (tensors + three token lists)."""
    tensors = [t for pv, pos in sample["images"] for t in (pv, pos)] + list(sample["audio"])
    return sum(t.nbytes for t in tensors) + 3 * 40 * len(sample["input_ids"]) + 500


def shuffled(samples: Iterator[dict], bufsize: int, rng: random.Random) -> Iterator[dict]:
    """A seeded shuffle buffer of `bufsize` samples."""
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < bufsize:
            buffer.append(sample)
            continue
        i = rng.randrange(bufsize)
        yield buffer[i]
        buffer[i] = sample
    rng.shuffle(buffer)
    yield from buffer


class SampleStream(torch.utils.data.IterableDataset):
    """Batches from shard specs; `make_loader` sets every argument from the data config (meanings: there)."""

    def __init__(self, spec, preprocess, *, batch_size: int, shuffle: int, seed: int, resampled: bool,
                 bucket_batches: int, pack_length: int, max_batch_tokens: int | None, state: StreamState | None,
                 allow_pipe: bool, split_by_rank: bool, max_shards: int | None, max_bad_fraction: float | None,
                 bad_check_after: int):
        super().__init__()
        self.components = [(resolve_shards(s, allow_pipe)[:max_shards], w) for s, w in mixture_components(spec)]
        self.preprocess, self.shuffle, self.seed, self.resampled = preprocess, shuffle, seed, resampled
        self.batching = dict(batch_size=batch_size, bucket_batches=bucket_batches, pack_length=pack_length,
                             max_batch_tokens=max_batch_tokens)
        self.state = state
        self.stats = DataStats()
        self.split_by_rank = split_by_rank
        self.max_bad_fraction, self.bad_check_after = max_bad_fraction, bad_check_after

    def __iter__(self) -> Iterator[dict]:
        self.stats = DataStats()  # this pass's counts: an epoch without workers must not re-send the previous ones
        state = self.state or StreamState()
        epoch = state.epoch
        seed = self.seed
        rank, world, worker, workers = worker_info(self.split_by_rank)
        filter_seen = state.filter_by_seen(world, workers)
        if self.resampled and filter_seen:
            seed, filter_seen = seed + 1_000_003 * state.resumes, False  # a new layout: a fresh stream
        rng = random.Random(f"{seed}/{epoch}/{rank}/{worker}")
        streams = [ShardStream(urls, seed, self.resampled, self.stats.skip, self.split_by_rank)(epoch)
                   for urls, _ in self.components]
        if filter_seen:
            streams = [state.skip_seen(s) for s in streams]
        raw = streams[0] if len(streams) == 1 else mix(streams, [w for _, w in self.components], rng)
        if self.shuffle:
            raw = shuffled(raw, self.shuffle, rng)
        stage = batch_stage(pad_id=self.preprocess_pad_id(), seed=seed + epoch, **self.batching)
        held = None  # each batch leaves once the next is formed: the epoch's last one counts the skips read after it
        for batch in stage(self._preprocessed(raw)):
            if held is not None:
                yield self._stamped(held, epoch, world, workers)
            held = batch
        if held is not None:
            yield self._stamped(held, epoch, world, workers)

    def _stamped(self, batch: dict, epoch: int, world: int, workers: int) -> dict:
        batch["stats"] = self.stats.snapshot(epoch)
        batch["position"] = {"world": world, "workers": workers}  # the reader layout, for resume
        return batch

    def _preprocessed(self, raw: Iterator[dict]) -> Iterator[dict]:
        for sample in raw:
            try:
                out = self.preprocess(sample)
            except Exception as exn:  # noqa: BLE001 - every failure is counted by reason and the run goes on
                self.stats.skip(exn)
                check_bad_fraction(self.stats.skipped, self.stats.ok, self.max_bad_fraction, self.bad_check_after)
                continue
            self.stats.ok += 1
            yield out

    def preprocess_pad_id(self) -> int:
        inner = getattr(self.preprocess, "preprocess", self.preprocess)  # through a MemoryCache
        return inner.tokens.pad


def make_loader(data: DataConfig | Mapping, preprocess: SamplePreprocessor, *, train: bool, spec=None, seed: int = 0,
                state: StreamState | None = None, world_size: int = 1,
                split_by_rank: bool = True) -> torch.utils.data.DataLoader:
    """A DataLoader over shards, set up by the data config `data` (a `DataConfig`, or the composed `cfg.data` /
    a run's saved `data` node, converted by `data_config`); its values are checked against the schema's rules.

    `train=True` reads `spec` (default `data.train`) as training does: `data.batch_size` per batch,
    `shuffle_buffer`, `resampled` (streams forever), `bucket_batches` / `pack_length` / `max_batch_tokens` (see
    `batching`), `cache_gb` (`MemoryCache`), the first `max_train_shards` shards, and `max_bad_fraction` of bad
    samples, counted once `bad_check_after` were read, stops the stream with one sentence (data where nothing
    passes would otherwise never form a batch). `train=False` reads `spec` (default `data.val`) as evaluation does:
    `data.eval_batch_size` per batch, each sample once in shard order, no packing, every bad sample counted.
    Both use `data.num_workers` loader processes and `data.allow_pipe`.

    The stream is a function of `seed`, the epoch and the (node, worker) slot: shards are dealt out with a seeded
    generator and the shuffle buffer is seeded too, so a rerun sees the same batches. `state`: a `StreamState`
    for exact resume (epoch-based streams skip the samples it has marked). Each batch carries `meta` (one entry
    per sample), `stats` (the loader process's ok / skipped counts so far in this epoch) and `position` (the
    reader layout: world size, workers). `split_by_rank=False`: this process reads every shard even under DDP
    (one rank evaluating all of val). `world_size`: for the too-few-shards warning.
    """
    data = data_config(data)
    check(data, DataConfig, "data")  # (a batch size of 0 would wait forever for an empty batch to fill)
    if spec is None:
        spec = data.train if train else data.val
    preprocess = MemoryCache(preprocess, data.cache_gb) if train and data.cache_gb > 0 else preprocess
    if train:
        reading = dict(batch_size=data.batch_size, shuffle=data.shuffle_buffer, resampled=data.resampled,
                       bucket_batches=data.bucket_batches, pack_length=data.pack_length,
                       max_batch_tokens=data.max_batch_tokens, max_shards=data.max_train_shards,
                       max_bad_fraction=data.max_bad_fraction, bad_check_after=data.bad_check_after)
    else:  # each sample once, in shard order, every bad one counted and none stopping the pass
        reading = dict(batch_size=data.eval_batch_size, shuffle=0, resampled=False, bucket_batches=1, pack_length=0,
                       max_batch_tokens=None, max_shards=None, max_bad_fraction=None, bad_check_after=0)
    dataset = SampleStream(spec, preprocess, seed=seed, state=state, allow_pipe=data.allow_pipe,
                           split_by_rank=split_by_rank, **reading)
    for urls, _ in dataset.components:
        warn_if_too_few_shards(urls, data.num_workers, world_size, f"data spec {str(spec)[:80]}")
    return ResumableLoader(dataset, batch_size=None, num_workers=data.num_workers,
                           persistent_workers=data.num_workers > 0 and dataset.resampled)


class ResumableLoader(torch.utils.data.DataLoader):
    """A DataLoader that, when its stream's `StreamState` was restored from a checkpoint, drops the
    batches already trained on in this epoch: the stream is a function of the seed, so the rest comes
    in exactly the order of an uninterrupted run (workers included)."""

    def __iter__(self):
        iterator = super().__iter__()
        state = self.dataset.state
        if state is None:
            return iterator
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        skip = state.take_replay(world, max(1, self.num_workers))
        for _ in range(skip):
            if next(iterator, None) is None:
                break
        return iterator


def preprocessor_for(model, image_tokens: int, audio_max_seconds: float | None = None,
                     max_length: int | None = None, jpeg_draft: bool = False,
                     max_image_megapixels: float = MAX_MEGAPIXELS) -> SamplePreprocessor:
    """The preprocessing that matches `model`'s projectors: it reads only the geometry of the projector contract
    (gemma_fusion/models/projectors/base.py), by name, since data/ never imports models/: `model.vision`'s
    `patch_size` and `pooling_kernel_size`, `model.audio`'s `frame_dim`, and `model.tokenizer` / `model.tokens`."""
    image = audio = None
    if model.vision is not None:
        image = ImagePreprocessor(image_tokens, model.vision.patch_size, model.vision.pooling_kernel_size, jpeg_draft,
                                  max_image_megapixels)
    if model.audio is not None:
        audio = AudioPreprocessor(samples_per_token=model.audio.frame_dim, max_seconds=audio_max_seconds)
    return SamplePreprocessor(model.tokenizer, model.tokens, image, audio, max_length)


def run_preprocessor(model, data, skip_long: bool = True) -> SamplePreprocessor:
    """`preprocessor_for` with a run's `data` settings (image_tokens, audio_max_seconds, max_length, jpeg_draft,
    max_image_megapixels; keys missing from older runs take their defaults). `skip_long=False` keeps samples
    over data.max_length (evaluation and prompts see every sample)."""
    return preprocessor_for(model, data.image_tokens, data.get("audio_max_seconds"),
                            data.get("max_length") if skip_long else None, data.get("jpeg_draft", False),
                            data.get("max_image_megapixels", MAX_MEGAPIXELS))
