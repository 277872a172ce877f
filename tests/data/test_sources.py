"""Shard sources: node/worker splitting, mixtures, determinism, resampled streams."""
from __future__ import annotations

import io
import json
import logging
import random
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from gemma_fusion.data.sources import ShardStream, mix, mixture_components, resolve_shards, warn_if_too_few_shards
from gemma_fusion.core.errors import UserError


def _shards(root: Path, name: str, n_shards: int, per_shard: int) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with tarfile.open(root / f"{name}-{s:06d}.tar", "w") as tar:
            for i in range(per_shard):
                data = json.dumps({"prompt": "p", "target": f"{name}{s}-{i}"}).encode()
                info = tarfile.TarInfo(f"{name}{s}-{i:03d}.json")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return resolve_shards(root)


def _keys(stream) -> list[str]:
    return [sample["__key__"] for sample in stream]


def test_every_node_and_worker_reads_disjoint_shards_covering_the_epoch(tmp_path, monkeypatch):
    urls = _shards(tmp_path, "a", n_shards=7, per_shard=3)
    seen = []
    for rank in range(2):
        for worker in range(2):
            for name, value in (("RANK", rank), ("WORLD_SIZE", 2), ("WORKER", worker), ("NUM_WORKERS", 2)):
                monkeypatch.setenv(name, str(value))
            seen += _keys(ShardStream(urls, seed=3, resampled=False, handler=None)(epoch=0))
    assert sorted(seen) == sorted(f"a{s}-{i:03d}" for s in range(7) for i in range(3))  # each exactly once


def test_epochs_reshuffle_shards_and_a_seed_fixes_the_order(tmp_path):
    urls = _shards(tmp_path, "a", n_shards=8, per_shard=2)
    stream = ShardStream(urls, seed=1, resampled=False, handler=None)
    assert _keys(stream(0)) == _keys(ShardStream(urls, seed=1, resampled=False, handler=None)(0))
    assert _keys(stream(0)) != _keys(stream(1)) and sorted(_keys(stream(0))) == sorted(_keys(stream(1)))
    assert [s["__index__"] for s in stream(0)][:2] == [0, 1]


def test_resampled_streams_go_on_forever(tmp_path):
    urls = _shards(tmp_path, "a", n_shards=2, per_shard=2)
    stream = ShardStream(urls, seed=0, resampled=True, handler=None)(0)
    assert len([next(stream) for _ in range(50)]) == 50


def test_weighted_mixture_follows_the_weights(tmp_path):
    a = _shards(tmp_path / "a", "a", 4, 500)
    b = _shards(tmp_path / "b", "b", 4, 500)
    streams = [ShardStream(urls, 0, True, None)(0) for urls in (a, b)]
    drawn = Counter(s["__key__"][0] for s, _ in zip(mix(streams, [3.0, 1.0], random.Random(0)), range(4000)))
    assert abs(drawn["a"] / 4000 - 0.75) < 0.03
    assert mixture_components([{"spec": "x", "weight": 2}, {"spec": "y"}]) == [("x", 2.0), ("y", 1.0)]
    with pytest.raises(UserError, match="weight"):
        mixture_components([{"spec": "x", "weight": 0}])


def test_an_exhausted_component_drops_out_of_an_epoch_mixture(tmp_path):
    a = _shards(tmp_path / "a", "a", 1, 5)
    b = _shards(tmp_path / "b", "b", 1, 50)
    streams = [ShardStream(urls, 0, False, None)(0) for urls in (a, b)]
    assert Counter(s["__key__"][0] for s in mix(streams, [10.0, 1.0], random.Random(0))) == {"a": 5, "b": 50}


def test_spec_forms(tmp_path):
    urls = _shards(tmp_path, "shard", 3, 1)
    assert resolve_shards(tmp_path) == urls == resolve_shards(str(tmp_path / "shard-*.tar"))
    assert resolve_shards(str(tmp_path / "shard-{000000..000002}.tar")) == urls
    assert resolve_shards([str(tmp_path / "shard-000000.tar"), str(tmp_path / "shard-00000[12].tar")]) == urls
    assert resolve_shards("https://host/data/s-{0..2}.tar") == [f"https://host/data/s-{i}.tar" for i in range(3)]


def test_a_spec_that_names_missing_shards_says_which(tmp_path):
    _shards(tmp_path, "shard", 3, 1)
    with pytest.raises(UserError, match=r"names 5 shards but 2 do not exist \(e.g. .*shard-000003.tar\)"):
        resolve_shards(str(tmp_path / "shard-{000000..000004}.tar"))
    with pytest.raises(UserError, match=r"'.*shard-9\*.tar' matches no .tar files \(in .*\['shard-000000.tar'"):
        resolve_shards(str(tmp_path / "shard-9*.tar"))
    with pytest.raises(UserError, match="the directory does not exist"):
        resolve_shards(str(tmp_path / "nowhere" / "*.tar"))


def test_fewer_shards_than_readers_warns(tmp_path, caplog):
    urls = _shards(tmp_path, "a", 3, 1)
    with caplog.at_level(logging.WARNING):
        warn_if_too_few_shards(urls, num_workers=2, world_size=2, what="data.train")
    assert "3 shards for 4 readers" in caplog.text


def test_a_mixture_written_on_the_command_line():
    from hydra import compose, initialize_config_dir

    from gemma_fusion.core.config import CONFIG_DIR, to_plain

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["data.train=[{spec: ocr/, weight: 3}, {spec: asr/, weight: 1}]"])
    assert mixture_components(to_plain(cfg.data.train)) == [("ocr/", 3.0), ("asr/", 1.0)]
