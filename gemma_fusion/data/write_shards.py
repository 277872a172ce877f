"""Manifest (JSON lines) -> validated webdataset tar shards + index.json, the loader's input.

    python -m gemma_fusion.data.write_shards --manifest raw/manifest.jsonl --out data/shards
    python -m gemma_fusion.data.write_shards --help    # every key (also as key=value: manifest=M out=O)

Every referenced file is decoded once with the loader's own `load_image` / `load_audio`, so broken,
oversized and empty media are caught here and not mid-training; the original bytes are stored.
A bad row is reported as one line on stderr and left out. Shards are built in a temporary
directory next to the output and renamed into place at the end. See docs/DATA.md, "Writing shards".
"""
from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import torch
from tqdm import tqdm

from gemma_fusion.data.audio import load_audio
from gemma_fusion.data.image import load_image
from gemma_fusion.data.pipeline import AUDIO_EXTS, IMAGE_EXTS
from gemma_fusion.core.cli import option, parse_cli
from gemma_fusion.core.errors import BadSample, UserError

# Rejection tags, in the order the checks run: a row is rejected with the first that fails.
REASONS = (
    "bad_row", "duplicate_id", "empty_target", "outside_root", "unsupported_extension", "missing_file",
    "image_undecodable", "image_too_large", "audio_undecodable", "audio_empty",
)
FORMAT = "gemma_fusion.shards/1"
MEDIA_EXTS = {"image": IMAGE_EXTS, "audio": AUDIO_EXTS}
SAMPLING_RATE = 16000  # load_audio's rate; audio_seconds are decoded samples / this
_ROW_KEYS = ("id", "image", "audio", "prompt", "target", "task")  # everything else is carried along
_TAR_BLOCK, _TAR_RECORD = 512, tarfile.RECORDSIZE  # tarfile pads the archive to whole records


@dataclass
class Rejected:
    """A bad row: its line number, id (None when unreadable), reason tag and a one-sentence detail."""

    line: int
    id: str | None
    reason: str
    detail: str


@dataclass
class Row:
    """A manifest row that passed the structural checks (decoding still to do)."""

    line: int
    id: str
    meta: dict  # the sample's json member: id, prompt, target, task if given, extra keys
    media: list[tuple[str, str]]  # (kind, path as written), images first, manifest order within a kind


@dataclass
class Sample:
    """A validated row: its members' bytes plus what index.json records about it."""

    members: list[tuple[str, bytes]]  # (name after the key, data): "json", "image.0.png", ...
    modality: str  # "image", "audio", "image+audio" or "text"
    image_sizes: list[tuple[int, int]]
    audio_seconds: float


# ------------------------------------------------------------------------------------ row checks
def parse_row(line: int, raw: bytes, seen_ids: set[str]) -> Row | Rejected:
    """The structural checks (bad_row, duplicate_id, empty_target) of one manifest line."""
    try:
        row = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        return Rejected(line, None, "bad_row", "The line is not valid UTF-8.")
    except json.JSONDecodeError as err:
        return Rejected(line, None, "bad_row", f"The line is not valid JSON ({err.msg} at column {err.colno}).")
    if not isinstance(row, dict):
        return Rejected(line, None, "bad_row", f"The line is a JSON {type(row).__name__}, not an object.")
    row_id = row.get("id") if isinstance(row.get("id"), str) else None
    problem = _row_problem(row)
    if problem:
        return Rejected(line, row_id, "bad_row", problem)
    if row_id in seen_ids:
        return Rejected(line, row_id, "duplicate_id", "An earlier row has the same id; ids must be unique.")
    seen_ids.add(row_id)
    target = row.get("target")
    if not isinstance(target, str) or not target.strip():
        shown = "missing" if target is None else f"{json.dumps(target)[:40]}"
        return Rejected(line, row_id, "empty_target", f"The target is {shown}; it must be a non-empty string.")
    meta = {key: row[key] for key in ("id", "prompt", "target", "task") if key in row}
    meta.update((key, value) for key, value in row.items() if key not in _ROW_KEYS)
    media = [(kind, path) for kind in MEDIA_EXTS for path in _paths(row.get(kind))]
    return Row(line, row_id, meta, media)


def _row_problem(row: dict) -> str | None:
    if not isinstance(row.get("id"), str) or not row["id"]:
        return "The row needs an `id` that is a non-empty string."
    if not isinstance(row.get("prompt"), str):
        return "The row needs a `prompt` string (it may be empty)."
    if "task" in row and not isinstance(row["task"], str):
        return "The `task` must be a string."
    for kind in MEDIA_EXTS:
        value = row.get(kind)
        items = value if isinstance(value, list) else [value]
        if value is not None and not all(isinstance(p, str) and p for p in items):
            return f"The `{kind}` must be a path or a list of paths (non-empty strings)."
    return None


def _paths(value: str | list[str] | None) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else value


def load_row(row: Row | Rejected, root: Path, allow_outside: bool) -> Sample | Rejected:
    """Resolve, read and decode a row's media (runs in the worker processes)."""
    if isinstance(row, Rejected):
        return row
    members = [("json", json.dumps(row.meta, ensure_ascii=False).encode("utf-8"))]
    sizes, seconds, per_kind = [], 0.0, Counter()
    try:
        files = [(kind, path, _resolve(kind, path, root, allow_outside)) for kind, path in row.media]
        for kind, path, file in files:
            try:
                data = file.read_bytes()
            except OSError as err:
                raise BadSample("missing_file", f"{path}: could not be read ({err.strerror}).") from err
            if kind == "image":
                sizes.append(_image_size(path, data))
            else:
                seconds += _audio_seconds(path, data)
            members.append((f"{kind}.{per_kind[kind]}.{Path(path).suffix[1:].lower()}", data))
            per_kind[kind] += 1
    except BadSample as err:
        return Rejected(row.line, row.id, err.reason, " ".join(str(err).split()))  # one line
    return Sample(members, "+".join(per_kind) or "text", sizes, seconds)


def _resolve(kind: str, path: str, root: Path, allow_outside: bool) -> Path:
    """The file behind `path` (relative to `root`); BadSample if a path rule fails."""
    resolved = (root / path).resolve()  # an absolute `path` replaces root; symlinks are followed
    if not allow_outside and not resolved.is_relative_to(root):
        raise BadSample("outside_root", f"{path}: resolves outside the manifest's directory {root} "
                                        "(allow with --allow-outside).")
    ext = Path(path).suffix[1:].lower()
    if ext not in MEDIA_EXTS[kind]:
        raise BadSample("unsupported_extension", f"{path}: .{ext} is not an {kind} extension "
                                                 f"({', '.join(MEDIA_EXTS[kind])}).")
    if not resolved.is_file():
        what = "is not a file" if resolved.exists() else "no such file"
        raise BadSample("missing_file", f"{path}: {what}.")
    return resolved


def _image_size(path: str, data: bytes) -> tuple[int, int]:
    """The upright (width, height) of an image file's bytes; BadSample if it does not decode."""
    try:
        size = load_image(data).size
    except BadSample as err:
        raise BadSample(err.reason, f"{path}: {err}") from err
    except Exception as err:  # a decoder crashing on a hostile file must not end a long run
        raise BadSample("image_undecodable", f"{path}: the decoder failed ({type(err).__name__}: {err}).") from err
    if min(size) < 1:
        raise BadSample("image_undecodable", f"{path}: decodes to an empty {size[0]}x{size[1]} image.")
    return size


def _audio_seconds(path: str, data: bytes) -> float:
    """The decoded duration of an audio file's bytes; BadSample if it does not decode or is empty."""
    try:
        samples = load_audio(data, SAMPLING_RATE).numel()
    except BadSample as err:
        raise BadSample(err.reason, f"{path}: {err}") from err
    except Exception as err:  # as above
        raise BadSample("audio_undecodable", f"{path}: the decoder failed ({type(err).__name__}: {err}).") from err
    if samples == 0:
        raise BadSample("audio_empty", f"{path}: the clip decodes to 0 samples.")
    return samples / SAMPLING_RATE


# ---------------------------------------------------------------------------------------- shards
@dataclass
class Shard:
    name: str
    samples: int = 0
    bytes: int = 0  # the tar's size once closed
    modalities: Counter = field(default_factory=lambda: Counter({"image": 0, "audio": 0, "image+audio": 0, "text": 0}))
    audio_seconds: float = 0.0
    image_sizes: list = field(default_factory=list)

    def to_json(self) -> dict:
        return dict(name=self.name, samples=self.samples, bytes=self.bytes, modalities=dict(self.modalities),
                    audio_seconds=round(self.audio_seconds, 6), image_sizes=[list(s) for s in self.image_sizes])


class ShardWriter:
    """Samples in order -> shard-NNNNNN.tar files, cut by sample count or by tar size in bytes."""

    def __init__(self, directory: Path, samples_per_shard: int, shard_bytes: int | None):
        self.directory, self.samples_per_shard, self.shard_bytes = directory, samples_per_shard, shard_bytes
        self.shards: list[Shard] = []
        self.written = 0
        self._tar: tarfile.TarFile | None = None
        self._content = 0  # bytes of headers + padded data in the open tar

    def add(self, sample: Sample) -> None:
        size = sum(_member_bytes(len(data)) for _, data in sample.members)
        if self._tar is None or self._full(size):
            self._open_next()
        key = f"{self.written:09d}"
        for name, data in sample.members:
            info = tarfile.TarInfo(f"{key}.{name}")  # fixed metadata: the bytes depend only on the manifest
            info.size, info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = (
                len(data), 0o644, 0, 0, 0, "", "")
            self._tar.addfile(info, io.BytesIO(data))
        self._content += size
        shard = self.shards[-1]
        shard.samples += 1
        shard.modalities[sample.modality] += 1
        shard.audio_seconds += sample.audio_seconds
        shard.image_sizes += sample.image_sizes
        self.written += 1

    def _full(self, size: int) -> bool:
        if self.shard_bytes is None:
            return self.shards[-1].samples >= self.samples_per_shard
        return _tar_bytes(self._content + size) > self.shard_bytes

    def _open_next(self) -> None:
        self.close()
        self.shards.append(Shard(f"shard-{len(self.shards):06d}.tar"))
        self._tar = tarfile.open(self.directory / self.shards[-1].name, "w", format=tarfile.USTAR_FORMAT)
        self._content = 0

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self.shards[-1].bytes = (self.directory / self.shards[-1].name).stat().st_size
            self._tar = None


def _member_bytes(size: int) -> int:
    return _TAR_BLOCK + -(-size // _TAR_BLOCK) * _TAR_BLOCK  # header + data padded to whole blocks


def _tar_bytes(content: int) -> int:
    return -(-(content + 2 * _TAR_BLOCK) // _TAR_RECORD) * _TAR_RECORD  # + end-of-archive blocks, whole records


# ------------------------------------------------------------------------------------------ main
def write_shards(manifest, out, samples_per_shard: int = 1000, shard_bytes: int | None = None, strict: bool = False,
                 allow_outside: bool = False, workers: int | None = None, overwrite: bool = False) -> dict:
    """Validate every row of `manifest` and write the good ones as shards plus index.json into `out`.

    `shard_bytes`, when given, cuts shards by tar size instead of by `samples_per_shard`. With
    `strict`, any bad row means nothing is written. Returns the summary
    {"written": N, "rejected": {reason: count}} (reasons with a count > 0, in `REASONS` order).

    Raises:
        UserError: the manifest is missing, `out` exists and is not empty (without `overwrite`), or an
            argument is out of range.
    """
    manifest, out = Path(manifest), Path(out).absolute()
    _check_arguments(manifest, out, samples_per_shard, shard_bytes, workers, overwrite)
    workers = workers or min(4, os.cpu_count() or 1)
    root = manifest.parent.resolve()
    with manifest.open("rb") as lines:
        total = sum(1 for raw in lines if raw.strip())

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0o022)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the shards are for sharing
    rejected: Counter = Counter()
    try:
        writer = ShardWriter(tmp, samples_per_shard, shard_bytes)
        with manifest.open("rb") as lines, _ordered_map(workers) as mapper:
            seen_ids: set[str] = set()
            rows = (parse_row(n, raw, seen_ids) for n, raw in enumerate(lines, 1) if raw.strip())
            results = mapper(partial(load_row, root=root, allow_outside=allow_outside), rows)
            for result in tqdm(results, total=total, unit="row", disable=None, file=sys.stderr):
                if isinstance(result, Rejected):
                    rejected[result.reason] += 1
                    tqdm.write(f"{manifest}:{result.line}: id={result.id or '?'}: {result.reason}: {result.detail}",
                               file=sys.stderr)
                elif not (strict and rejected):  # strict: once a row is bad, only validate
                    writer.add(result)
        writer.close()
        summary = {"written": 0 if strict and rejected else writer.written,
                   "rejected": {reason: rejected[reason] for reason in REASONS if rejected[reason]}}
        if not (strict and rejected):
            index = {"format": FORMAT, "samples": writer.written, "shards": [s.to_json() for s in writer.shards],
                     "rejected": summary["rejected"], "manifest": str(manifest.resolve())}
            (tmp / "index.json").write_text(json.dumps(index) + "\n")
            _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def _check_arguments(manifest: Path, out: Path, samples_per_shard, shard_bytes, workers, overwrite) -> None:
    if not manifest.is_file():
        raise UserError(f"The manifest {manifest} does not exist or is not a file.")
    if samples_per_shard < 1 or (shard_bytes is not None and shard_bytes < 1) or (workers is not None and workers < 1):
        raise UserError("--samples-per-shard, --shard-bytes and --workers must be positive integers.")
    if out.exists() and not out.is_dir():
        raise UserError(f"The output {out} exists and is not a directory; choose another --out.")
    if manifest.resolve().is_relative_to(out.resolve()):
        raise UserError(f"The output {out} holds the manifest; choose an --out outside the source data.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"The output directory {out} is not empty; choose a new --out or pass --overwrite.")


@contextmanager
def _ordered_map(workers: int):
    """A lazy map that yields results in input order: in-process for one worker, else a Pool's imap."""
    if workers == 1:
        yield map
        return
    with Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:  # one thread per process
        yield partial(pool.imap, chunksize=16)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` to `out`, replacing an empty (or, with --overwrite, old) `out`."""
    if not out.exists():
        tmp.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    out.rename(old / out.name)
    tmp.rename(out)
    shutil.rmtree(old)


@dataclass
class WriteShardsOptions:
    """Manifest (JSON lines) -> validated webdataset tar shards + index.json, the loader's input."""

    manifest: Path = option(help="JSON lines: id, image, audio, prompt, target", metavar="FILE")
    out: Path = option(help="output directory for the shards and index.json", metavar="DIR")
    samples_per_shard: int | None = option(None, "samples per tar (null: 1000, or shard_bytes decides)")
    shard_bytes: int | None = option(None, "largest tar size in bytes (a bigger sample gets its own tar)")
    strict: bool = option(False, "any bad row: write nothing and exit 1")
    allow_outside: bool = option(False, "accept paths outside the manifest's directory")
    workers: int | None = option(None, "decoding processes (null: min(4, CPUs))")
    overwrite: bool = option(False, "replace a non-empty out")

    def validate(self) -> None:
        if self.samples_per_shard is not None and self.shard_bytes is not None:
            raise UserError("pass --samples-per-shard or --shard-bytes, not both.")


def main(argv: list[str] | None = None) -> int:
    """CLI; the last stdout line is the JSON summary. Exit 0, 1 (--strict and a bad row) or 2 (usage)."""
    args = parse_cli(WriteShardsOptions, argv, prog="python -m gemma_fusion.data.write_shards")
    per_shard = 1000 if args.samples_per_shard is None else args.samples_per_shard
    try:
        summary = write_shards(args.manifest, args.out, per_shard, args.shard_bytes, args.strict,
                               args.allow_outside, args.workers, args.overwrite)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    bad = sum(summary["rejected"].values())
    failed = args.strict and bad > 0
    print(f"{bad} rows rejected: nothing written (--strict)" if failed else
          f"{summary['written']} samples written to {args.out}, {bad} rows rejected", file=sys.stderr)
    print(json.dumps(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
