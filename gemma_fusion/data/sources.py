"""Where samples come from: shard specs -> URLs -> raw samples, split by node and worker, mixed by weight.

A spec is a directory of `.tar` shards, a glob, a brace pattern (`shard-{000000..000999}.tar`), an
http(s) URL pattern, a list of those (concatenated), or a list of `{spec, weight}` mappings (a weighted
mixture). `pipe:` URLs run a shell command per shard, so they are refused unless the user turns them on
(`data.allow_pipe=true`).

Every raw sample leaves here with `__url__` (its shard) and `__index__` (its position in that shard): the
pair names the sample for exact resume (`StreamState`).
"""
from __future__ import annotations

import glob
import logging
import os
import random
from collections.abc import Iterator, Mapping
from pathlib import Path

import webdataset as wds

from gemma_fusion.errors import UserError

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
    if spec.startswith(("http://", "https://")) or "{" in spec:
        return list(wds.shardlists.expand_urls(spec))
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
        return number_samples(wds.tarfile_to_samples(handler=self.handler)(shards))


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
