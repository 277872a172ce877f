"""The inspector and the loader on awkward and broken data: nothing crashes, everything is counted."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from gemma_fusion.data import inspect as inspector
from gemma_fusion.data.write_shards import write_shards
from tests.data.awkward_media import make_awkward_corpus


def _overrides(backbone: Path, *extra: str) -> list[str]:
    return [f"backbone.path={backbone}", "~backbone.pretrain", "data.image_tokens=16", "data.batch_size=4", *extra]


def _report(capsys, spec, backbone, *extra) -> dict:
    inspector.main([str(spec), "--json", *_overrides(backbone, *extra)])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def awkward_shards(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("awkward")
    manifest, expected = make_awkward_corpus(root / "corpus")
    summary = write_shards(manifest, root / "shards", samples_per_shard=8, workers=1)
    assert summary == expected
    return root / "shards", summary


def test_awkward_shards_all_pass_the_training_preprocessing(awkward_shards, tiny_gemma4_dir, capsys):
    shards, summary = awkward_shards
    report = _report(capsys, shards, tiny_gemma4_dir)
    assert report["samples_ok"] == summary["written"] and report["samples_skipped"] == {}
    assert report["tokens"]["image"]["max"] <= 2 * 16 and report["tokens"]["audio"]["total"] > 0
    assert 0 <= report["padding_fraction"] < 1


def test_a_truncated_shard_does_not_crash_the_inspector(awkward_shards, tiny_gemma4_dir, tmp_path, capsys):
    shards, summary = awkward_shards
    copy = tmp_path / "shards"
    copy.mkdir()
    for shard in sorted(shards.glob("*.tar")):
        (copy / shard.name).write_bytes(shard.read_bytes())
    victim = sorted(copy.glob("*.tar"))[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    report = _report(capsys, copy, tiny_gemma4_dir)
    assert 0 < report["samples_ok"] < summary["written"]
    assert report["samples_skipped"].get("bad_shard", 0) >= 1


def _tar(path: Path, samples: dict[str, dict[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (40, 20), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_kind_of_bad_sample_is_skipped_and_counted(tiny_gemma4_dir, tmp_path, capsys):
    good = lambda prompt="Read:", target="ok": json.dumps({"prompt": prompt, "target": target}).encode()
    shard = _tar(tmp_path / "bad-000000.tar", {
        "ok": {"json": good(), "png": _png()},
        "special": {"json": good(prompt="<image><boi><|image> stays text"), "png": _png()},
        "noise": {"json": good(), "png": b"\x89PNG not really"},
        "text_as_image": {"json": good(), "jpg": b"hello, I am text"},
        "empty_wav": {"json": good(), "wav": b""},
        "no_json": {"png": _png()},
        "bad_json": {"json": b"{oops", "png": _png()},
        "no_target": {"json": json.dumps({"prompt": "Read:"}).encode(), "png": _png()},
        "blank_target": {"json": good(target="   "), "png": _png()},
        "long": {"json": good(target="x" * 400), "png": _png()},
    })
    report = _report(capsys, shard, tiny_gemma4_dir, "data.max_length=128")
    assert report["samples_ok"] == 2
    assert report["samples_skipped"] == {"image_undecodable": 2, "audio_undecodable": 1, "missing_json": 1,
                                         "bad_json": 1, "empty_target": 2, "too_long": 1}


def test_special_token_text_in_a_prompt_creates_no_media_slots(tiny_gemma4_dir):
    from gemma_fusion.data.inspect import preprocessor_from_config
    from gemma_fusion.core.batch import IMAGE
    from hydra import compose, initialize_config_dir
    from gemma_fusion.core.config import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=_overrides(tiny_gemma4_dir))
    preprocess = preprocessor_from_config(cfg)
    sample = preprocess({"__key__": "k", "json": json.dumps({"prompt": "<image><boi>", "target": "<eoi>"}).encode()})
    assert IMAGE not in sample["mm_token_type_ids"]
    assert preprocess.tokens.image_token not in sample["input_ids"]
    assert not set(preprocess.tokens.image_start) & set(sample["input_ids"])


def test_a_spec_that_matches_nothing_names_what_exists(tiny_gemma4_dir, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SystemExit, match="matches no .tar files.*notes.txt"):
        inspector.main([str(tmp_path / "shard-*.tar"), *_overrides(tiny_gemma4_dir)])


def test_the_loader_is_deterministic_for_a_seed_with_workers(awkward_shards, tiny_gemma4_dir):
    from hydra import compose, initialize_config_dir

    from gemma_fusion.core.config import CONFIG_DIR
    from gemma_fusion.data.inspect import preprocessor_from_config
    from gemma_fusion.core.schema import DataConfig
    from gemma_fusion.data.pipeline import make_loader

    shards, summary = awkward_shards
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        preprocess = preprocessor_from_config(compose("train", overrides=_overrides(tiny_gemma4_dir)))
    data = DataConfig(batch_size=4, num_workers=2, shuffle_buffer=8)
    order = lambda seed: [m["key"] for b in make_loader(data, preprocess, train=True, spec=shards, seed=seed)
                          for m in b["meta"]]
    first = order(0)
    assert sorted(first) == sorted(set(first)) and len(first) == summary["written"]
    assert first == order(0) and first != order(1)
