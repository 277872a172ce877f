"""Where samples come from: shard specs -> URLs -> raw samples, split by node and worker, mixed by weight.

A spec is a directory of `.tar` shards, a glob, a brace pattern (`shard-{000000..000999}.tar`), an
http(s) URL pattern, a list of those (concatenated), or a list of `{spec, weight}` mappings (a weighted
mixture). `pipe:` URLs run a shell command per shard, so they are refused unless the user turns them on
(`data.allow_pipe=true`).

Every raw sample leaves here with `__url__` (its shard) and `__index__` (its position in that shard): the
pair names the sample for exact resume (`StreamState`). Members stay bytes (nothing is unpickled or decoded
here), and a shard cut short costs the sample it was cut in and its tail, never a half sample (`read_shards`).
"""
from __future__ import annotations

import glob
import logging
import os
import random
import tarfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import webdataset as wds

from gemma_fusion.core.errors import BadSample, UserError

log = logging.getLogger(__name__)


def resolve_shards(spec, allow_pipe: bool = False) -> list[str]:
    """A directory, a glob, a brace pattern, a URL or a list of them -> shard URLs (sorted within a spec)."""
    if isinstance(spec, (list, tuple)):
        return [url for s in spec for url in resolve_shards(s, allow_pipe)]
    spec = str(spec)
    if spec.startswith("pipe:"):
        if not allow_pipe:
            raise UserError(f"The shard spec '{spec}' runs a shell command; set data.allow_pipe=true if you trust it.")
        return list(wds.shardlists.expand_urls(spec))
    if spec.startswith(("http://", "https://")):
        return list(wds.shardlists.expand_urls(spec))
    if "{" in spec:  # a local brace pattern: every shard it names must be there
        urls = list(wds.shardlists.expand_urls(str(Path(spec).expanduser())))
        missing = [url for url in urls if not Path(url).is_file()]
        if missing:
            raise UserError(f"The shard pattern '{spec}' names {len(urls)} shards but {len(missing)} do not exist "
                            f"(e.g. {missing[0]}); check the range or the data paths.")
        return urls
    path = Path(spec).expanduser()
    urls = sorted(str(p) for p in path.glob("*.tar")) if path.is_dir() else sorted(glob.glob(str(path)))
    if not urls:
        where = path if path.is_dir() else path.parent
        found = sorted(os.listdir(where))[:10] if where.is_dir() else "the directory does not exist"
        raise UserError(f"The shard pattern '{spec}' matches no .tar files (in {where}: {found}); check data paths.")
    return urls


def mixture_components(spec) -> list[tuple[object, float]]:
    """`[{spec, weight}, ...]` -> [(spec, weight)]; any other spec is one component of weight 1."""
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(s, Mapping) for s in spec):
        components = []
        for i, item in enumerate(spec):
            if "spec" not in item:
                raise UserError(f"Mixture entry {i} ({dict(item)}) has no 'spec'; write {{spec: PATTERN, weight: W}}.")
            weight = float(item.get("weight", 1.0))
            if weight <= 0:
                raise UserError(f"Mixture entry {i} ({item['spec']}) has weight {weight}; weights must be > 0.")
            components.append((item["spec"], weight))
        return components
    if isinstance(spec, (list, tuple)) and any(isinstance(s, Mapping) for s in spec):
        raise UserError("A data spec list mixes plain patterns and {spec, weight} entries; use one form.")
    return [(spec, 1.0)]


def number_samples(samples: Iterator[dict]) -> Iterator[dict]:
    """webdataset stage: `__index__` = the sample's position inside its shard."""
    url, index = None, 0
    for sample in samples:
        if sample.get("__url__") != url:
            url, index = sample.get("__url__"), 0
        sample["__index__"] = index
        index += 1
        yield sample


def worker_info(split_by_rank: bool = True) -> tuple[int, int, int, int]:
    """(rank, world size, worker id, workers per rank) of the calling process; rank 0 of 1 when the data is
    not split by rank."""
    rank, world, worker, workers = wds.utils.pytorch_worker_info()
    return (rank, world, worker, workers) if split_by_rank else (0, 1, worker, workers)


class ShardStream:
    """The raw samples of one spec for this node and worker: one epoch at a time, or resampled forever.

    Epoch mode: shards are shuffled with `seed + epoch` and dealt out to (node, worker) slots, so every
    shard is read by exactly one worker of one node per epoch. Resampled mode: each worker draws shards
    with replacement from a generator seeded by (seed, rank, worker).
    """

    def __init__(self, urls: list[str], seed: int, resampled: bool, handler, split_by_rank: bool = True):
        self.urls, self.seed, self.resampled, self.handler = urls, seed, resampled, handler
        self.split_by_rank = split_by_rank  # False: every process reads all shards (evaluation on one rank)

    def __call__(self, epoch: int) -> Iterator[dict]:
        rank, world, worker, workers = worker_info(self.split_by_rank)
        if self.resampled:
            rng = random.Random(f"{self.seed}/{epoch}/{rank}/{worker}")
            shards = ({"url": rng.choice(self.urls)} for _ in iter(int, 1))
        else:
            order = list(self.urls)
            random.Random(f"{self.seed}/{epoch}").shuffle(order)
            slots = world * workers
            shards = ({"url": url} for url in order[rank * workers + worker:: slots])
        return number_samples(read_shards(shards, self.handler))


def read_shards(shards: Iterator[dict], handler) -> Iterator[dict]:
    """Raw samples (`__key__`, `__url__`, then member suffix -> bytes) of each `{"url": ...}` in `shards`, in order.

    Replaces webdataset's `tarfile_to_samples`, which passes the sample a truncated shard was cut in on without
    its remaining members (a caption trained without its image, or an image counted as `missing_json`), counts
    a cut inside a member twice and misses a cut inside a header. Here each sample is passed on only once the
    next one starts or the end-of-archive marker is read, so a cut loses the sample in progress and the rest of
    the shard, counted once by `handler` (reason bad_shard). `handler(exn)` returns False to stop reading.
    """
    for shard in wds.tariterators.url_opener(shards, handler=handler):
        try:
            with shard["stream"] as stream:
                yield from _tar_samples(stream, shard["url"], handler)
        except Exception as exn:  # noqa: BLE001 - counted by the handler; the shard's tail is lost
            exn.args = (f"{exn} @ {shard['url']}",)
            if not handler(exn):
                return


def _tar_samples(stream, url: str, handler) -> Iterator[dict]:
    """The samples of one tar stream; consecutive members `<key>.<suffix>` form a sample (webdataset's rule)."""
    sample, repeated = None, False
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            key, suffix = wds.tariterators.base_plus_ext(info.name)
            if not info.isreg() or key is None or info.name.startswith("__"):  # folders, links, shard metadata
                continue
            data = tar.extractfile(info).read()
            if sample is None or key != sample["__key__"]:
                if sample is not None and not repeated:
                    yield sample
                sample, repeated = {"__key__": key, "__url__": url}, False
            suffix = suffix.lower()
            if suffix in sample and not repeated:  # which copy is meant is unknown: the sample is skipped
                repeated = True
                if not handler(BadSample("duplicate_id", f"sample {key} of {url} has two .{suffix} members; "
                                                         "write each member once.")):
                    return
            sample[suffix] = data
        # tarfile ends quietly on a header cut short; a complete archive ends with a whole (zero) block
        if tar.fileobj.tell() - tar.offset < tarfile.BLOCKSIZE:
            raise tarfile.ReadError("the shard ends inside a tar header or before its end-of-archive marker "
                                    "(truncated); re-copy or rewrite it")
    if sample is not None and not repeated:
        yield sample


def warn_if_too_few_shards(urls: list[str], num_workers: int, world_size: int, what: str) -> None:
    slots = max(1, num_workers) * max(1, world_size)
    if len(urls) < slots:
        log.warning("%s has %d shards for %d readers (%d workers x %d processes): %d readers get no data; "
                    "write more, smaller shards.", what, len(urls), slots, max(1, num_workers), world_size,
                    slots - len(urls))


def mix(streams: list[Iterator[dict]], weights: list[float], rng: random.Random) -> Iterator[dict]:
    """Interleave `streams`, drawing each next sample from stream i with probability ∝ weights[i];
    an exhausted stream drops out and the rest go on until all are done."""
    streams, weights = list(streams), list(weights)
    while streams:
        i = rng.choices(range(len(streams)), weights)[0]
        try:
            yield next(streams[i])
        except StopIteration:
            del streams[i], weights[i]
