"""Training on shards full of bad input: every bad sample is skipped and counted by reason, no good one is lost."""
from __future__ import annotations

import csv
import io
import json
import pathlib
import pickle
import random
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from lightning.pytorch.callbacks import Callback
from PIL import Image

from gemma_fusion.training import recipe
from gemma_fusion.training import callbacks
from tests.data.awkward_media import _bomb_png


def _image(width: int, height: int, fmt: str = "PNG") -> bytes:
    ys, xs = np.mgrid[0:height, 0:width]
    pixels = np.stack([xs * 255 // max(width - 1, 1), ys * 255 // max(height - 1, 1), (xs + ys) % 256], -1)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


def _audio(rate: int, channels: int = 1, fmt: str = "WAV", subtype: str = "PCM_16", seconds: float = 0.15) -> bytes:
    wave = 0.3 * np.sin(2 * np.pi * 440 * np.arange(round(rate * seconds)) / rate)
    buffer = io.BytesIO()
    sf.write(buffer, np.repeat(wave[:, None], channels, axis=1), rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def _json(prompt: str = "Describe:", target: str = "a test sample") -> bytes:
    return json.dumps({"prompt": prompt, "target": target}).encode()


class _Touch:
    """Unpickling this creates `path`: a member that must never be unpickled."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (self.path,)


def _tar(path: Path, samples: dict[str, list[tuple[str, bytes]]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for suffix, data in members:
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _cut(path: Path, member: str, where: str) -> None:
    """Truncate the tar at `path` halfway through `member`'s data or its header."""
    with tarfile.open(path) as tar:
        info = tar.getmember(member)
    data = path.read_bytes()
    path.write_bytes(data[: info.offset_data + info.size // 2 if where == "data" else info.offset + 100])


def _write_shards(root: Path, marker: Path) -> tuple[set[str], Counter]:
    """Shards of good and bad samples in `root`; returns (the keys of the good samples, bad samples by reason)."""
    root.mkdir()
    photo, square = _image(64, 48, "JPEG"), _image(40, 20)
    good = {
        "png_40x20": [("json", _json()), ("png", square)],
        "jpeg_64x48": [("json", _json()), ("jpg", photo)],
        "png_1x1": [("json", _json()), ("png", _image(1, 1))],
        "png_strip_100_to_1": [("json", _json()), ("png", _image(1000, 10))],
        "jpeg_strip_1_to_100": [("json", _json()), ("jpeg", _image(10, 1000, "JPEG"))],
        "wav_8k_pcm16": [("json", _json("Transcribe:")), ("wav", _audio(8000))],
        "flac_44k_stereo": [("json", _json("Transcribe:")), ("flac", _audio(44100, 2, "FLAC"))],
        "wav_48k_float": [("json", _json("Transcribe:")), ("wav", _audio(48000, subtype="FLOAT"))],
        "image_and_audio": [("json", _json()), ("png", square), ("wav", _audio(16000))],
        "special_token_text": [("json", _json("<image><boi><audio><eos>", "<eoi><image><eos> stays text"))],
        "special_token_text_with_image": [("json", _json("<image><boi>", "<audio><eos>")), ("png", square)],
        "pickle_members": [("json", _json()), ("png", square), ("pickle", pickle.dumps(_Touch(marker))),
                           ("pyd", pickle.dumps(_Touch(marker))), ("pth", pickle.dumps(_Touch(marker)))],
    }
    bad = {  # reason -> samples
        "image_undecodable": {"noise_png": [("json", _json()), ("png", np.random.default_rng(0).bytes(3000))],
                              "truncated_jpeg": [("json", _json()), ("jpg", photo[: len(photo) // 2])],
                              "empty_png": [("json", _json()), ("png", b"")]},
        "image_too_large": {"bomb_png_900_megapixels": [("json", _json()), ("png", _bomb_png())]},
        "audio_undecodable": {"noise_wav": [("json", _json()), ("wav", np.random.default_rng(1).bytes(3000))],
                              "empty_wav": [("json", _json()), ("wav", b"")]},
        "audio_empty": {"zero_frame_wav": [("json", _json()), ("wav", _audio(16000, seconds=0))]},
        "missing_json": {"no_json": [("png", square)]},
        "bad_json": {"invalid_json": [("json", b"{oops"), ("png", square)],
                     "json_not_an_object": [("json", b"[1, 2]"), ("png", square)]},
        "empty_target": {"blank_target": [("json", _json(target="  \n")), ("png", square)],
                         "no_target": [("json", b'{"prompt": "Describe:"}'), ("png", square)]},
        "too_long": {"too_long": [("json", _json(target="x" * 400)), ("png", square)]},
        "duplicate_id": {"repeated_member": [("json", _json()), ("json", _json()), ("png", square)]},
    }
    bad_samples = [sample for samples in bad.values() for sample in samples.items()]
    mixed = [*good.items(), *bad_samples[2:]]
    random.Random(0).shuffle(mixed)
    # every shard ends in a bad sample (or a cut): the epoch's last skips are read after its last batch is formed
    _tar(root / "mixed-000000.tar", dict([*mixed[: len(mixed) // 2], bad_samples[0]]))
    _tar(root / "mixed-000001.tar", dict([*mixed[len(mixed) // 2:], bad_samples[1]]))

    # two shards cut short: in a member's data and in a member's header; the samples before the cut are good
    for name, where in (("cut-000000.tar", "data"), ("cut-000001.tar", "header")):
        head = {f"{where}_cut_ok_0": good["png_40x20"], f"{where}_cut_ok_1": good["wav_8k_pcm16"]}
        _tar(root / name, {**head, f"{where}_cut_victim": [("json", _json()), ("png", _image(200, 100))],
                           f"{where}_cut_lost": good["png_40x20"]})
        _cut(root / name, f"{where}_cut_victim.png", where)
        good.update(head)
    counts = Counter({reason: len(samples) for reason, samples in bad.items()}) + Counter(bad_shard=2)
    return set(good), counts


class _KeysPerEpoch(Callback):
    """The sample keys of every trained batch, and the number of batches, per epoch."""

    def __init__(self):
        self.keys: dict[int, list[str]] = {}
        self.batches: Counter = Counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.keys.setdefault(trainer.current_epoch, []).extend(m["key"] for m in batch["meta"])
        self.batches[trainer.current_epoch] += 1


@pytest.mark.parametrize("batch_size", [1, 4])  # 1: every batch leaves as soon as its sample is read
def test_training_skips_and_counts_every_bad_input_and_trains_every_good_sample(batch_size, make_cfg, tmp_path,
                                                                              monkeypatch):
    """Two epochs over the shards: each trains every good sample exactly once and nothing else, the skip counts
    logged after each equal the planted bad samples per reason (once, then twice), and no member is unpickled."""
    marker = tmp_path / "unpickled"
    pickle.loads(pickle.dumps(_Touch(tmp_path / "payload_works")))  # the payload is live...
    assert (tmp_path / "payload_works").exists()
    good, planted = _write_shards(tmp_path / "shards", marker)
    recorder = _KeysPerEpoch()
    build = callbacks.build_callbacks
    monkeypatch.setattr(callbacks, "build_callbacks", lambda cfg, run_dir: [*build(cfg, run_dir), recorder])
    run = tmp_path / "run"

    cfg = make_cfg(f"data.train={tmp_path / 'shards'}", "data.resampled=false", "data.cache_gb=0",
                   f"data.batch_size={batch_size}", "data.max_length=128", "data.max_bad_fraction=1.0",
                   "trainer.max_steps=1000", "+trainer.max_epochs=2", "eval_after_train=false")
    recipe.train(cfg, run)

    assert (run / "final" / "trainable.safetensors").is_file()
    assert not marker.exists()  # ...and nothing unpickled it
    assert set(recorder.keys) == {0, 1}
    for epoch, keys in recorder.keys.items():
        assert sorted(keys) == sorted(good), f"epoch {epoch}: each good sample exactly once, nothing else"

    with (run / "metrics.csv").open(newline="") as f:  # one row per batch, counts summed since the start
        rows = sorted((r for r in csv.DictReader(f) if r.get("data/skipped")), key=lambda r: int(r["step"]))
    assert len(rows) == sum(recorder.batches.values())
    for row, epochs in ((rows[recorder.batches[0] - 1], 1), (rows[-1], 2)):  # the last batch of each epoch
        skipped = {k.removeprefix("data/skipped_"): float(v) for k, v in row.items()
                   if k.startswith("data/skipped_") and v}
        assert skipped == {reason: epochs * n for reason, n in planted.items()}, f"after epoch {epochs}"
        assert float(row["data/samples_ok"]) == epochs * len(good)
