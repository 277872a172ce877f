"""Tests of the demo-data generator: reproducibility, caching, sample contents, DTMF signal."""

import io
import json
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds
from PIL import Image

from gemma_fusion.data import demo

TINY = dict(train_per_task=5, val_per_task=3, seed=0, samples_per_shard=4)


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
    demo.main(["--out", str(out), "--train-per-task", "5", "--val-per-task", "3", "--samples-per-shard", "4"])
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
    for split, per_task in (("train", TINY["train_per_task"]), ("val", TINY["val_per_task"])):
        samples = [s for shard in sorted((tiny / split).glob("*.tar")) for s in _samples(shard)]
        order = demo.split_order(TINY["seed"], split, per_task)
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
