"""Tests of the shard writer on a corpus of awkward real-world formats (tests/data/awkward_media.py)."""

import io
import json
import re
import subprocess
import sys
import tarfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import soundfile as sf
import webdataset as wds
from PIL import Image

from gemma_fusion.data.write_shards import REASONS, main, write_shards
from gemma_fusion.core.errors import BadSample
from tests.data.awkward_media import make_awkward_corpus

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    return make_awkward_corpus(tmp_path_factory.mktemp("awkward") / "corpus")


@pytest.fixture(scope="module")
def cli_run(corpus, tmp_path_factory) -> tuple[Path, int, str, str]:
    """`main` on the whole corpus with 2 workers and 5 samples per shard: (out, exit code, stdout, stderr)."""
    out = tmp_path_factory.mktemp("cli") / "shards"
    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        code = main(["--manifest", str(corpus[0]), "--out", str(out), "--workers", "2", "--samples-per-shard", "5"])
    return out, code, stdout.getvalue(), stderr.getvalue()


def _rows(manifest: Path) -> dict[int, dict | None]:
    """Line number -> manifest row (None for a line that is not JSON)."""
    rows = {}
    for number, text in enumerate(manifest.read_text().splitlines(), 1):
        try:
            rows[number] = json.loads(text)
        except json.JSONDecodeError:
            rows[number] = None
    return rows


def _samples(out: Path) -> list[dict]:
    """Every sample of every shard in order: {"key", "shard", "members": {name after the key: bytes}}."""
    samples = []
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for info in tar.getmembers():
                assert info.isfile() and info.mode == 0o644 and info.mtime == 0
                assert (info.uid, info.gid, info.uname, info.gname) == (0, 0, "", "")
                key, name = info.name.split(".", 1)
                if not samples or samples[-1]["key"] != key:
                    samples.append({"key": key, "shard": shard.name, "members": {}})
                samples[-1]["members"][name] = tar.extractfile(info).read()
    return samples


def _summary(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def _write_manifest(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _tar_size(member_sizes: list[int]) -> int:
    """A tar's size: 512-byte header + data padded to 512 per member, two zero blocks, whole 10 KiB records."""
    content = sum(512 + -(-size // 512) * 512 for size in member_sizes) + 1024
    return -(-content // 10240) * 10240


def _media(row: dict, kind: str) -> list[str]:
    value = row.get(kind, [])
    return [value] if isinstance(value, str) else value


def test_every_good_file_is_kept_byte_for_byte(corpus, cli_run):
    manifest, expected = corpus
    out, code, _, _ = cli_run
    good = [row for row in _rows(manifest).values() if row and row["expect"]["reason"] is None]
    samples = _samples(out)
    assert code == 0 and len(good) == expected["written"] == len(samples)
    assert [s["key"] for s in samples] == [f"{i:09d}" for i in range(len(samples))]
    for row, sample in zip(good, samples):
        meta = json.loads(sample["members"].pop("json").decode("utf-8"))
        assert meta == {k: v for k, v in row.items() if k not in ("image", "audio")}  # extra keys carried along
        media = {f"{kind}.{i}.{Path(path).suffix[1:].lower()}": (manifest.parent / path).read_bytes()
                 for kind in ("image", "audio") for i, path in enumerate(_media(row, kind))}
        assert sample["members"] == media, row["id"]
    names = {name for s in samples for name in s["members"]}
    assert {"image.0.jpeg", "image.0.bmp", "image.0.tif", "image.1.png", "audio.1.wav"} <= names


def test_every_bad_row_is_reported_once_with_its_reason(corpus, cli_run):
    manifest, expected = corpus
    _, code, stdout, stderr = cli_run
    assert code == 0 and _summary(stdout) == expected
    bad = {number: ("?" if row is None else row["id"], "bad_row" if row is None else row["expect"]["reason"])
           for number, row in _rows(manifest).items() if row is None or row["expect"]["reason"]}
    pattern = re.compile(rf"^{re.escape(str(manifest))}:(\d+): id=(.+?): ({'|'.join(REASONS)}): \S.*\.$")
    reported = {}
    for line in stderr.splitlines()[:-1]:  # the last line is the human summary
        number, row_id, reason = pattern.match(line).groups()
        assert int(number) not in reported
        reported[int(number)] = (row_id, reason)
    assert reported == bad
    assert len(stderr.splitlines()) == len(bad) + 1


def test_module_entry_point(corpus, tmp_path):
    manifest = _write_manifest(corpus[0].parent / "entry.jsonl", [
        {"id": "a", "prompt": "", "target": "t", "image": "images/pixel.png"},
        {"id": "b", "prompt": "", "target": "t", "audio": "audio/nothing_here.wav"}])
    done = subprocess.run([sys.executable, "-m", "gemma_fusion.data.write_shards", "--manifest", str(manifest),
                           "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert _summary(done.stdout) == {"written": 1, "rejected": {"missing_file": 1}}
    assert f"{manifest}:2: id=b: missing_file: audio/nothing_here.wav: no such file." in done.stderr.splitlines()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["index.json", "shard-000000.tar"]


def test_strict_exits_1_and_writes_nothing(corpus, tmp_path, capsys):
    good = [{"id": "a", "prompt": "", "target": "t", "image": "images/pixel.png"},
            {"id": "b", "prompt": "", "target": "t", "audio": "audio/blip_20ms.wav"}]
    bad = {"id": "c", "prompt": "", "target": "t", "image": "images/absent.png"}
    manifest = _write_manifest(corpus[0].parent / "strict.jsonl", [good[0], bad, good[1]])
    out = tmp_path / "out"
    assert main(["--manifest", str(manifest), "--out", str(out), "--strict", "--workers", "1"]) == 1
    captured = capsys.readouterr()
    assert _summary(captured.out) == {"written": 0, "rejected": {"missing_file": 1}}
    assert f"{manifest}:2: id=c: missing_file: images/absent.png: no such file." in captured.err.splitlines()
    assert list(tmp_path.iterdir()) == []  # no output, no temporary directory left behind

    _write_manifest(manifest, good)
    assert main(["--manifest", str(manifest), "--out", str(out), "--strict", "--workers", "1"]) == 0
    assert _summary(capsys.readouterr().out) == {"written": 2, "rejected": {}}


def test_allow_outside_accepts_paths_outside_the_manifest_directory(corpus, tmp_path, capsys):
    root = corpus[0].parent
    outside = [row for row in _rows(corpus[0]).values() if row and row["expect"]["reason"] == "outside_root"]
    assert {row["image"] for row in outside} == {"../outside.png", str(root.parent / "outside.png"),
                                                 "images/link_to_outside.png"}
    manifest = _write_manifest(root / "outside.jsonl", outside)
    assert write_shards(manifest, tmp_path / "refused", workers=1) == {"written": 0, "rejected": {"outside_root": 3}}
    summary = write_shards(manifest, tmp_path / "allowed", allow_outside=True, workers=1)
    assert summary == {"written": 3, "rejected": {}}
    images = [s["members"]["image.0.png"] for s in _samples(tmp_path / "allowed")]
    assert images == [(root.parent / "outside.png").read_bytes()] * 3


def test_same_shards_for_one_and_two_workers(corpus, cli_run, tmp_path):
    serial = tmp_path / "serial"
    assert write_shards(corpus[0], serial, samples_per_shard=5, workers=1) == corpus[1]
    files = sorted(p.name for p in cli_run[0].iterdir())
    assert files == sorted(p.name for p in serial.iterdir()) and len(files) > 2
    for name in files:
        assert (serial / name).read_bytes() == (cli_run[0] / name).read_bytes(), name


def test_shard_bytes_is_a_limit_and_a_bigger_sample_gets_its_own_shard(corpus, tmp_path):
    small = ["images/exif_rot6.jpg", "audio/tone_8k_pcm16.wav", "images/progressive.jpg"]
    rows = [{"id": str(i), "prompt": "", "target": "t", ("audio" if path.endswith("wav") else "image"): path}
            for i, path in enumerate(small * 4)]
    rows.insert(5, {"id": "big", "prompt": "", "target": "t", "image": "images/big_24mp.jpg"})
    manifest = _write_manifest(corpus[0].parent / "bytes.jsonl", rows)
    limit = 65_000  # not a whole number of 10 KiB tar records
    assert write_shards(manifest, tmp_path / "out", shard_bytes=limit, workers=1)["written"] == 13
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    samples = _samples(tmp_path / "out")
    for shard in index["shards"]:
        assert shard["bytes"] == (tmp_path / "out" / shard["name"]).stat().st_size
        assert shard["bytes"] <= limit or shard["samples"] == 1
    big = [s["shard"] for s in samples if json.loads(s["members"]["json"])["id"] == "big"][0]
    assert [s["samples"] for s in index["shards"] if s["name"] == big] == [1]
    assert len(index["shards"]) > 2 and any(s["samples"] > 2 for s in index["shards"])  # cut, and packed
    for before, after in zip(index["shards"], index["shards"][1:]):  # greedy: the next sample did not fit
        first = next(s for s in samples if s["shard"] == after["name"])
        grown = [s for s in samples if s["shard"] == before["name"]] + [first]
        assert _tar_size([len(data) for s in grown for data in s["members"].values()]) > limit


def test_samples_per_shard_and_index_counts(corpus, cli_run):
    manifest, expected = corpus
    out = cli_run[0]
    index = json.loads((out / "index.json").read_text())
    assert index["format"] == "gemma_fusion.shards/1" and index["manifest"] == str(manifest.resolve())
    assert index["samples"] == expected["written"] == 26 and index["rejected"] == expected["rejected"]
    assert [s["samples"] for s in index["shards"]] == [5, 5, 5, 5, 5, 1]
    samples = _samples(out)
    totals = dict.fromkeys(("image", "audio", "image+audio", "text"), 0)
    for shard in index["shards"]:
        assert shard["bytes"] == (out / shard["name"]).stat().st_size
        own = [s for s in samples if s["shard"] == shard["name"]]
        expects = [json.loads(s["members"]["json"])["expect"] for s in own]
        kinds = ["+".join(k for k in ("image", "audio") if any(n.startswith(k) for n in s["members"])) or "text"
                 for s in own]
        assert shard["modalities"] == {k: kinds.count(k) for k in totals}
        assert shard["image_sizes"] == [size for e in expects for size in e["image_sizes"]]
        assert shard["audio_seconds"] == pytest.approx(sum(sum(e["audio_seconds"]) for e in expects), abs=1e-3)
        totals = {k: totals[k] + shard["modalities"][k] for k in totals}
    assert totals == {"image": 15, "audio": 8 + ("MP3" in sf.available_formats()), "image+audio": 1, "text": 1}
    rotated = next(s for s in samples if json.loads(s["members"]["json"])["id"] == "exif_rotated_jpeg")
    assert Image.open(io.BytesIO(rotated["members"]["image.0.jpg"])).size == (200, 100)  # stored landscape
    sizes = [size for shard in index["shards"] for size in shard["image_sizes"]]
    assert [100, 200] in sizes and [200, 100] not in sizes  # recorded upright


def test_shards_read_back_with_webdataset(cli_run):
    out = cli_run[0]
    expected = _samples(out)
    dataset = wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False)
    samples = list(dataset)
    assert [s["__key__"] for s in samples] == [s["key"] for s in expected]
    for sample, want in zip(samples, expected):
        assert json.loads(sample["json"])["id"]
        assert {k: v for k, v in sample.items() if not k.startswith("__")} == want["members"]


def test_refuses_a_non_empty_out_unless_overwrite(corpus, tmp_path, capsys):
    manifest = _write_manifest(tmp_path / "src.jsonl", [{"id": "t", "prompt": "Say:", "target": "hi"}])
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["--manifest", str(manifest), "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: The output directory {out} is not empty; choose a new --out or pass --overwrite."]
    assert (out / "notes.txt").exists()
    assert main(["--manifest", str(manifest), "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "shard-000000.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src.jsonl"]  # no temporary directories left
    with pytest.raises(SystemExit):
        main(["--manifest", str(manifest), "--out", str(out), "--samples-per-shard", "3", "--shard-bytes", "9"])


def test_reason_tags_are_documented_with_bad_sample():
    assert all(re.search(rf"\b{reason}\b", BadSample.__doc__) for reason in REASONS)
