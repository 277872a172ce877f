"""Tests of the demo-data generator: reproducibility, caching, the test split's own stream, sample contents, DTMF
signal."""

import hashlib
import io
import json
import shutil
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds
from PIL import Image

from gemma_fusion.data import demo

TINY = dict(train_per_task=5, val_per_task=3, test_per_task=3, seed=0, samples_per_shard=4)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _samples(shard: Path) -> list[dict]:
    """The samples of one shard in order, as {"__key__": ..., ext: bytes}."""
    samples = []
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            if not samples or samples[-1]["__key__"] != key:
                samples.append({"__key__": key})
            samples[-1][ext] = tar.extractfile(member).read()
    return samples


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return demo.ensure_demo_data(tmp_path_factory.mktemp("tiny") / "demo", **TINY, num_workers=2, progress=False)


def test_bytes_identical_across_runs_and_worker_counts(tiny, tmp_path):
    again = demo.ensure_demo_data(tmp_path / "demo", **TINY, num_workers=1, progress=False)
    assert _files(again) == _files(tiny)
    assert sorted(p.name for p in (tiny / "train").iterdir()) == [f"shard-{i:06d}.tar" for i in range(4)]


def test_second_call_is_a_noop(tmp_path):
    out = demo.ensure_demo_data(tmp_path / "demo", **TINY, progress=False)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    demo.main(["--out", str(out), "--train-per-task", "5", "--val-per-task", "3", "--test-per-task", "3",
               "--samples-per-shard", "4"])
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no temp directories left behind


def test_changed_parameter_regenerates(tiny, tmp_path):
    out = demo.ensure_demo_data(tmp_path / "demo", **TINY, progress=False)
    demo.ensure_demo_data(out, **{**TINY, "seed": 1}, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["params"]["seed"] == 1
    assert _files(out) != _files(tiny)
    demo.ensure_demo_data(out, **{**TINY, "samples_per_shard": 100}, progress=False)
    assert [p.name for p in (out / "train").iterdir()] == ["shard-000000.tar"]
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


def test_incomplete_dataset_regenerates(tiny, tmp_path):
    out = demo.ensure_demo_data(tmp_path / "demo", **TINY, progress=False)
    (out / "val" / "shard-000000.tar").write_bytes(b"truncated")
    demo.ensure_demo_data(out, **TINY, progress=False)
    assert _files(out) == _files(tiny)


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        demo.ensure_demo_data(tmp_path, **TINY, progress=False)
    assert (tmp_path / "notes.txt").exists()


def test_samples_decode_and_match_their_task(tiny):
    manifest = json.loads((tiny / "manifest.json").read_text())
    for split in ("train", "val", "test"):
        samples = [s for shard in sorted((tiny / split).glob("*.tar")) for s in _samples(shard)]
        seed = demo.TEST_SEED if split == "test" else TINY["seed"]
        order = demo.split_order(seed, split, TINY[f"{split}_per_task"])
        assert [s["__key__"] for s in samples] == [f"{task}-{split}-{i:06d}" for _, task, i in order]
        counts = defaultdict(int)
        for sample in samples:
            meta = json.loads(sample["json"].decode("utf-8"))
            task, target = meta["task"], meta["target"]
            counts[task] += 1
            assert meta["prompt"] == demo.TASKS[task]
            assert 3 <= len(target) <= 6 and set(target) <= set(demo.ALPHABETS[task])
            if task == "dtmf":
                (ext,) = set(sample) & {"wav", "flac"}
                audio, sr = sf.read(io.BytesIO(sample[ext]), dtype="float32")
                n = len(target)
                assert audio.ndim == 1 and sr in demo.SAMPLE_RATES
                assert n * 0.08 + (n - 1) * 0.08 - 0.01 <= len(audio) / sr <= n * 0.16 + (n - 1) * 0.12 + 0.41
            else:
                image = Image.open(io.BytesIO(sample["png"]))
                assert image.format == "PNG" and image.mode == "RGB" and image.size == demo.IMAGE_SIZE
        assert counts == manifest["counts"][split]


def _media_digests(split_dir: Path) -> list[str]:
    """sha256 of every sample's image or audio bytes in a split (targets are short strings that may repeat; the
    rendered, noisy media of two samples are identical only when drawn from the same random stream)."""
    return [hashlib.sha256(data).hexdigest() for shard in sorted(split_dir.glob("*.tar")) for sample in _samples(shard)
            for ext, data in sample.items() if ext not in ("__key__", "json")]


def test_the_test_split_is_a_stream_of_its_own_recorded_in_the_manifest(tmp_path):
    # test_seed equal to seed and as many samples as val: only the split's own stream keeps test apart
    out = demo.ensure_demo_data(tmp_path / "demo", **TINY, test_seed=TINY["seed"], progress=False)
    media = {split: _media_digests(out / split) for split in ("train", "val", "test")}
    assert len(media["test"]) == len(set(media["test"])) == 3 * TINY["test_per_task"]
    assert set(media["test"]).isdisjoint(media["train"] + media["val"])
    shard_digests = {split: {hashlib.sha256(p.read_bytes()).digest() for p in (out / split).glob("*.tar")}
                     for split in ("train", "val", "test")}
    assert shard_digests["test"].isdisjoint(shard_digests["train"] | shard_digests["val"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["params"]["test_seed"] == TINY["seed"]
    assert manifest["params"]["test_per_task"] == manifest["counts"]["test"] == {t: 3 for t in demo.TASKS}
    assert [s["name"] for s in manifest["shards"]["test"]] == sorted(p.name for p in (out / "test").iterdir())


def _identities(out: Path, split: str) -> dict[str, int]:
    """Each shard's inode: a kept shard keeps it (renamed), a regenerated one is a new file."""
    return {p.name: p.stat().st_ino for p in sorted((out / split).iterdir())}


def test_the_test_split_keeps_its_own_seed(tiny, tmp_path):
    out = demo.ensure_demo_data(tmp_path / "demo", **TINY, progress=False)
    test_files = _identities(out, "test")
    demo.ensure_demo_data(out, **{**TINY, "seed": 1}, progress=False)  # new train and val, the same test
    assert _identities(out, "test") == test_files and _files(out / "test") == _files(tiny / "test")
    assert _files(out / "train") != _files(tiny / "train") and _files(out / "val") != _files(tiny / "val")
    kept = {split: _identities(out, split) for split in ("train", "val")}
    demo.ensure_demo_data(out, **{**TINY, "seed": 1}, test_seed=2, progress=False)  # a new test split alone
    assert {split: _identities(out, split) for split in ("train", "val")} == kept
    assert _files(out / "test") != _files(tiny / "test")
    assert json.loads((out / "manifest.json").read_text())["params"]["test_seed"] == 2


def test_data_made_before_the_test_split_gets_one_and_keeps_train_and_val(tiny, tmp_path, capsys):
    out = demo.ensure_demo_data(tmp_path / "demo", **TINY, progress=False)
    shutil.rmtree(out / "test")  # what the generator wrote before it had a test split: no trace of one
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["params"]["test_per_task"], manifest["params"]["test_seed"]
    del manifest["counts"]["test"], manifest["shards"]["test"]
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    kept = {split: _identities(out, split) for split in ("train", "val")}
    demo.ensure_demo_data(out, **TINY)
    assert f"demo data in {out}: generating test, keeping train and val" in capsys.readouterr().err
    assert {split: _identities(out, split) for split in ("train", "val")} == kept
    assert _files(out) == _files(tiny)  # as if made at once
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


def test_shards_read_with_webdataset(tiny):
    urls = [str(p) for p in sorted((tiny / "val").glob("*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == 3 * TINY["val_per_task"]
    assert all(("png" in s) != ("wav" in s or "flac" in s) for s in samples)


def test_render_text_image_is_deterministic():
    first = demo.render_text_image("ab12", np.random.default_rng(3))
    assert first.size == demo.IMAGE_SIZE and first.mode == "RGB"
    assert first.tobytes() == demo.render_text_image("ab12", np.random.default_rng(3)).tobytes()
    with pytest.raises(ValueError):
        demo.render_text_image("123456789", np.random.default_rng(0))


@pytest.mark.parametrize("seed", range(6))
def test_dtmf_timing(seed):
    digits = "1100999"[: 3 + seed % 5]
    audio, sr, segments = demo.synth_dtmf(digits, np.random.default_rng(seed), return_segments=True)
    assert audio.dtype == np.float32 and np.abs(audio).max() <= 1.0
    assert len(segments) == len(digits)
    assert segments[0][0] <= 0.2 * sr + 1 and len(audio) - segments[-1][1] <= 0.2 * sr + 1
    for start, end in segments:
        assert 0.10 * sr - 1 <= end - start <= 0.16 * sr + 1
    for (_, end), (start, _) in zip(segments, segments[1:]):
        assert 0.08 * sr - 1 <= start - end <= 0.12 * sr + 1  # also separates repeated digits


@pytest.mark.parametrize("seed", range(10))
def test_dtmf_first_tone_has_the_row_and_column_peaks(seed):
    digits = "0123456789"[seed:] + "0123456789"[:seed]
    audio, sr, segments = demo.synth_dtmf(digits[:4], np.random.default_rng(seed), return_segments=True)
    start, end = segments[0]
    tone = audio[start:end] * np.hanning(end - start)
    spectrum = np.abs(np.fft.rfft(tone, n=8 * len(tone)))
    freqs = np.fft.rfftfreq(8 * len(tone), 1 / sr)
    row, col = demo.DTMF_FREQS[digits[0]]
    for expected, (lo, hi) in ((row, (600, 1050)), (col, (1100, 1600))):
        band = (freqs >= lo) & (freqs <= hi)
        peak = freqs[band][np.argmax(spectrum[band])]
        assert abs(peak - expected) <= 0.015 * expected + 2 * sr / len(tone)
        assert spectrum[band].max() > 10 * np.median(spectrum[(freqs > 200) & (freqs < sr / 2)])
