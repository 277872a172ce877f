"""The loader's bookkeeping: which samples were trained on (exact resume) and which were skipped (bad samples).

`StreamState` lives in the main process. The training loop counts the batches it has stepped on and
marks their samples; the state goes into the checkpoint (plain ints and strings, so
`torch.load(weights_only=True)` reads it). On resume the loader replays the epoch's seeded stream and
drops the batches already trained on (same reader layout), or its workers drop the samples already
marked (another layout), so after any number of kills and resumes every sample of an epoch is trained
on exactly once — whatever the number of workers, the shuffle buffer or the batching.

`DataStats` counts, per loader process, the samples that came through and the ones skipped by reason;
each batch carries a snapshot so the main process can sum them over workers (`StatsTotals`).
"""
from __future__ import annotations

import logging
import tarfile
from collections import Counter

from gemma_fusion.core.errors import UserError
from gemma_fusion.data.sources import worker_info

log = logging.getLogger(__name__)


class StreamState:
    """Where the training stream stands: the epoch, the batches trained on in it, the reader layout, and
    the (shard URL, index in shard) pairs already trained on in this epoch.

    On resume with the same readers (loader workers x processes), the loader regenerates the epoch's
    deterministic stream and drops the first `batches` batches in the main process (`replay`), so the
    run continues with exactly the batches, in the order, an uninterrupted run would have seen. With a
    different layout the shards are dealt out differently, so the readers instead drop the samples
    already trained on (`seen`): each sample still comes once per epoch, in a different order.
    """

    def __init__(self):
        self.epoch = 0
        self.resumes = 0
        self.seen: dict[str, set[int]] = {}
        self.batches = 0  # batches trained on in this epoch
        self.layout: list[int] | None = None  # [world size, workers per process] of the readers
        self.replay: int | None = None  # set on resume: batches to drop in `epoch` (None: not resuming)

    def mark(self, meta: list[dict], position: dict | None = None) -> None:
        for m in meta:
            if m.get("url") is not None:
                self.seen.setdefault(m["url"], set()).add(m["index"])
        self.batches += 1
        if position is not None:
            self.layout = [position["world"], position["workers"]]

    def next_epoch(self) -> None:
        self.epoch += 1
        self.seen, self.batches, self.replay = {}, 0, None

    def filter_by_seen(self, world: int, workers: int) -> bool:
        """Resuming with another reader layout: readers must drop the samples already trained on."""
        return self.replay is not None and self.layout != [world, workers]

    def take_replay(self, world: int, workers: int) -> int:
        """Batches the main process drops once when resuming with the same layout (then 0)."""
        skip = self.replay if self.replay is not None and self.layout == [world, workers] else 0
        self.replay = None if skip else self.replay
        return skip

    def skip_seen(self, samples):
        """webdataset stage: drop raw samples already trained on in this epoch (a snapshot taken at start)."""
        seen = {url: frozenset(indices) for url, indices in self.seen.items()}
        for sample in samples:
            if sample["__index__"] not in seen.get(sample.get("__url__"), ()):
                yield sample

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "resumes": self.resumes, "batches": self.batches, "layout": self.layout,
                "seen": {url: _runs(sorted(indices)) for url, indices in self.seen.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.resumes = int(state.get("resumes", 0)) + 1
        self.seen = {url: {i for start, stop in runs for i in range(start, stop)} for url, runs in state["seen"].items()}
        self.batches = int(state.get("batches", 0))
        self.layout = state.get("layout")
        self.replay = self.batches


def _runs(indices: list[int]) -> list[list[int]]:
    """Sorted ints -> [[start, stop), ...] runs (compact in the checkpoint)."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return runs


def reason_of(exn: Exception) -> str:
    """The counter key of a failure: BadSample's reason, a broken tar, or the exception type."""
    if hasattr(exn, "reason"):
        return exn.reason
    if isinstance(exn, (tarfile.TarError, EOFError)) or "tar" in type(exn).__module__:
        return "bad_shard"
    return type(exn).__name__


def check_bad_fraction(skipped: Counter, ok: int, max_bad_fraction: float | None, check_after: int) -> None:
    """Stop with one sentence once `check_after` samples were read and more than `max_bad_fraction` were bad
    (skips of a modality the model was built without do not count: `FILTERED_REASONS`)."""
    bad = Counter({r: n for r, n in skipped.items() if r not in FILTERED_REASONS})
    total = sum(bad.values()) + ok
    if max_bad_fraction is None or total < check_after or sum(bad.values()) <= max_bad_fraction * total:
        return
    reasons = ", ".join(f"{r}: {n}" for r, n in bad.most_common())
    raise UserError(f"{sum(bad.values())} of {total} samples so far were bad ({reasons}), more than "
                    f"data.max_bad_fraction={max_bad_fraction}; check the data with `python -m "
                    "gemma_fusion.data.inspect` or raise the limit.")


class DataStats:
    """Samples ok / skipped by reason in one loader process; `skip` is a webdataset handler."""

    def __init__(self):
        self.ok = 0
        self.skipped: Counter = Counter()

    def skip(self, exn: Exception) -> bool:
        reason = reason_of(exn)
        if not self.skipped[reason]:
            log.warning("skipping a bad sample (%s): %s", reason, exn)
        self.skipped[reason] += 1
        return True

    def snapshot(self, epoch: int = 0) -> dict:
        """This process's counts so far in this epoch (each epoch counts afresh), keyed by epoch, rank and worker."""
        rank, _, worker, _ = worker_info()
        return {"source": f"{epoch}/{rank}/{worker}", "ok": self.ok, "skipped": dict(self.skipped)}


FILTERED_REASONS = frozenset({"no_vision", "no_audio"})


class StatsTotals:
    """Sums the latest `DataStats` snapshot of every loader process and epoch (each counts its own samples)."""

    def __init__(self):
        self.latest: dict[str, dict] = {}

    def update(self, snapshot: dict | None) -> None:
        if snapshot:
            self.latest[snapshot["source"]] = snapshot

    @property
    def ok(self) -> int:
        return sum(s["ok"] for s in self.latest.values())

    @property
    def skipped(self) -> Counter:
        total: Counter = Counter()
        for s in self.latest.values():
            total.update(s["skipped"])
        return total
