"""Tests of the batching stages of the data pipeline (on synthetic tokenized samples)."""

import random

import pytest
import torch

from gemma_fusion.data.batching import batch_stage


def _sample(i: int, kind: str, length: int) -> dict:
    frames = [torch.zeros(length, 4)] if kind == "audio" else []
    images = [(torch.zeros(2, 4), torch.zeros(2, 2, dtype=torch.long))] if kind == "image" else []
    return dict(input_ids=[7] * length, labels=[-100] * length, mm_token_type_ids=[0] * length, images=images,
                audio=frames, key=f"{kind}-{i}", task=kind, prompt="", target=None)


def _stream(n: int = 200, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [_sample(i, rng.choice(["audio", "image"]), rng.randint(5, 60)) for i in range(n)]


def _padding(batches) -> float:
    mask = [b["attention_mask"] for b in batches]
    return 1 - sum(m.sum().item() for m in mask) / sum(m.numel() for m in mask)


def test_every_sample_once_in_single_modality_batches():
    for bucket in (1, 4):
        batches = list(batch_stage(8, 0, bucket, seed=1)(iter(_stream())))
        keys = [m["key"] for b in batches for m in b["meta"]]
        assert sorted(keys) == sorted(s["key"] for s in _stream())
        assert all(len({m["modality"] for m in b["meta"]}) == 1 for b in batches)
        assert all(len(b["meta"]) == 8 for b in batches[:-2])  # only each modality's last batch may be short


def test_length_bucketing_cuts_padding_and_is_deterministic():
    plain = _padding(list(batch_stage(8, 0)(iter(_stream()))))
    stage = batch_stage(8, 0, bucket_batches=8, seed=3)
    bucketed = list(stage(iter(_stream())))
    assert _padding(bucketed) < plain / 3
    again = list(batch_stage(8, 0, bucket_batches=8, seed=3)(iter(_stream())))
    assert [m["key"] for b in bucketed for m in b["meta"]] == [m["key"] for b in again for m in b["meta"]]


def test_packing_fills_rows_and_keeps_every_sample_once():
    stream = _stream(1000)
    batches = list(batch_stage(4, 0, bucket_batches=16, seed=0, pack_length=128)(iter(stream)))
    keys = [m["key"] for b in batches for m in b["meta"]]
    assert sorted(keys) == sorted(s["key"] for s in stream)
    assert _padding(batches) <= 0.05
    for b in batches:
        seg, pos, mask = b["segment_ids"], b["position_ids"], b["attention_mask"]
        assert b["input_ids"].shape[1] <= 128
        assert torch.equal(seg > 0, mask.bool())
        starts = torch.ones_like(seg, dtype=torch.bool)
        starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
        assert torch.equal(pos[starts & mask.bool()], torch.zeros_like(pos[starts & mask.bool()]))  # restart at 0
        n_samples = int(sum(len(set(row[row > 0].tolist())) for row in seg))
        assert n_samples == len(b["meta"])


def test_token_budget_batches():
    batches = list(batch_stage(8, 0, bucket_batches=4, seed=0, max_batch_tokens=200)(iter(_stream(200))))
    assert all(b["input_ids"].numel() <= 200 for b in batches)
    assert sum(len(b["meta"]) for b in batches) == 200
    assert len({b["input_ids"].shape[0] for b in batches}) > 1  # the count per batch follows the lengths


def test_a_batch_size_below_one_is_refused_instead_of_waiting_forever():
    from gemma_fusion.core.errors import UserError
    from gemma_fusion.core.schema import DataConfig
    from gemma_fusion.data.pipeline import make_loader

    for train, key in ((True, "batch_size"), (False, "eval_batch_size")):
        with pytest.raises(UserError, match=f"^data.{key}=0 is out of range: it must be an integer >= 1"):
            make_loader(DataConfig(**{key: 0}), None, train=train, spec="unused")


def test_samples_of_a_modality_the_model_lacks_are_not_bad_data():
    from gemma_fusion.data.state import StatsTotals, check_bad_fraction
    from gemma_fusion.core.errors import UserError

    totals = StatsTotals()
    totals.update({"source": "w0", "ok": 60, "skipped": {"no_audio": 30, "image_undecodable": 10}})
    assert sum(totals.skipped.values()) == 40
    check_bad_fraction(totals.skipped, totals.ok, 0.15, 50)  # 10 bad of 70 (the 30 no_audio left out): < 0.15
    with pytest.raises(UserError, match=r"^10 of 70 samples so far were bad \(image_undecodable: 10\)"):
        check_bad_fraction(totals.skipped, totals.ok, 0.14, 50)
    check_bad_fraction(totals.skipped, totals.ok, 0.14, 71)  # not checked before 71 samples
