"""Batching stages: one modality per batch, optional length bucketing, packing and token budgets.

All are webdataset stages (`samples -> batches`) that run inside the loader workers:

- `bucket_batches=k`: gather k batches' worth of samples of a modality, sort them by length, cut them
  into batches of similar length (emitted in a seeded random order).
- `pack_length=L`: put several samples into one row of at most L tokens (first-fit decreasing over a
  pool of about `bucket_batches` batches of rows); each sample keeps its own positions (restarting at 0)
  and a `segment_ids` number, and the model confines attention to each sample. Samples longer than L get
  a row of their own; rows that do not fill a batch go back to the pool and are re-packed.
- `max_batch_tokens=T`: batch by a token budget (rows x padded length <= T) instead of a fixed count.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Iterator

from gemma_fusion.data.collate import collate, modality


def pack_rows(samples: list[dict], pack_length: int) -> list[list[dict]]:
    """First-fit decreasing: samples -> rows of total length <= pack_length (longer samples alone)."""
    rows: list[list[dict]] = []
    room: list[int] = []
    for sample in sorted(samples, key=lambda s: -len(s["input_ids"])):
        n = len(sample["input_ids"])
        for i, free in enumerate(room):
            if n <= free:
                rows[i].append(sample)
                room[i] -= n
                break
        else:
            rows.append([sample])
            room.append(pack_length - n)
    return rows


def merge_row(samples: list[dict]) -> dict:
    """Several samples -> one packed sample with restarted `position_ids` and 1-based `segment_ids`."""
    if len(samples) == 1 and "position_ids" not in samples[0]:
        return samples[0]
    row = {key: [] for key in ("input_ids", "labels", "mm_token_type_ids", "position_ids", "segment_ids",
                               "images", "audio", "parts")}
    for number, sample in enumerate(samples, start=1):
        n = len(sample["input_ids"])
        for key in ("input_ids", "labels", "mm_token_type_ids", "images", "audio"):
            row[key] += sample[key]
        row["position_ids"] += range(n)
        row["segment_ids"] += [number] * n
        row["parts"].append(sample)
    return row


def _rows_to_batches(rows: list, batch_size: int, max_batch_tokens: int | None) -> tuple[list[list], list]:
    """Cut rows into full batches; returns (batches, leftover rows that do not fill a batch)."""
    batches, current, longest = [], [], 0
    for row in rows:
        n = len(row["input_ids"]) if isinstance(row, dict) else sum(len(s["input_ids"]) for s in row)
        if max_batch_tokens is not None:
            if current and (len(current) + 1) * max(longest, n) > max_batch_tokens:
                batches.append(current)
                current, longest = [], 0
        current.append(row)
        longest = max(longest, n)
        if max_batch_tokens is None and len(current) == batch_size:
            batches.append(current)
            current, longest = [], 0
    return batches, current


def batch_stage(
    batch_size: int,
    pad_id: int,
    bucket_batches: int = 1,
    seed: int = 0,
    pack_length: int = 0,
    max_batch_tokens: int | None = None,
    on_batch: Callable[[dict], None] | None = None,
) -> Callable[[Iterator[dict]], Iterator[dict]]:
    """webdataset stage: samples -> collated batches, one modality per batch (see the module docstring).

    `on_batch(batch)` is called on every batch before it leaves (the loader attaches its counters there).
    """
    pool_size = batch_size * max(1, bucket_batches)
    pool_tokens = pool_size * pack_length  # packing: gather enough tokens for `bucket_batches` batches of rows
    sort = bucket_batches > 1 or pack_length > 0

    def emit(rows: list) -> Iterator[dict]:
        batch = collate([merge_row(r) for r in rows] if pack_length else rows, pad_id)
        if on_batch is not None:
            on_batch(batch)
        yield batch

    def flush(pool: list, carry: list, rng: random.Random, final: bool) -> Iterator[dict]:
        """Batch the pool; what does not fill a batch waits in `carry` for the next flush (packing: as
        samples, so a half-empty row is re-packed rather than sent)."""
        if pack_length:
            rows = pack_rows(carry + pool, pack_length)
            rows.sort(key=lambda r: -sum(len(s["input_ids"]) for s in r))  # fullest rows first
        else:
            rows = carry + (sorted(pool, key=lambda s: len(s["input_ids"])) if sort else pool)
        batches, leftover = _rows_to_batches(rows, batch_size, max_batch_tokens)
        if final and leftover:
            batches, leftover = batches + [leftover], []
        if sort:
            rng.shuffle(batches)
        pool.clear()
        carry[:] = [s for row in leftover for s in row] if pack_length else leftover
        for rows in batches:
            yield from emit(rows)

    def full(pool: list, tokens: int) -> bool:
        return tokens >= pool_tokens if pack_length else len(pool) == pool_size

    def stage(samples: Iterator[dict]) -> Iterator[dict]:
        rng = random.Random(seed)
        pools: dict[str, list] = {}
        tokens: dict[str, int] = {}
        carries: dict[str, list] = {}
        for sample in samples:
            kind = modality(sample)
            pool = pools.setdefault(kind, [])
            pool.append(sample)
            tokens[kind] = tokens.get(kind, 0) + len(sample["input_ids"])
            if full(pool, tokens[kind]):
                tokens[kind] = 0
                yield from flush(pool, carries.setdefault(kind, []), rng, final=False)
        for kind, pool in pools.items():
            yield from flush(pool, carries.setdefault(kind, []), rng, final=True)
    return stage
