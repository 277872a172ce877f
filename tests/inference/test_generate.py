"""KV-cached generation against full re-computation: same logits, same tokens, one new token per step."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from gemma_fusion import FusionModel
from gemma_fusion.inference.generate import CachedDecoder, FullDecoder, generate, greedy_generate
from tests.inference.conftest import llama_fusion, prompt_batch, sharpened


@pytest.fixture(params=["gemma4", "gemma4_sliding", "llama"])
def model(request) -> FusionModel:
    if request.param == "llama":
        return sharpened(llama_fusion(request.getfixturevalue("tiny_llama_dir")))
    path = request.getfixturevalue("tiny_gemma4_dir" if request.param == "gemma4" else "tiny_gemma4_sliding_dir")
    return sharpened(FusionModel.from_pretrained(path))


def _row(batch: dict, i: int) -> dict:
    """Row i of a `prompt_batch` (one image, one clip per row) as a batch of one, its padding cut."""
    n = int(batch["attention_mask"][i].sum())
    text = {k: batch[k][i : i + 1, :n] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    media = {k: batch[k][i : i + 1] for k in ("pixel_values", "image_position_ids", "input_features",
                                               "input_features_mask")}
    return {**text, **media}


@torch.no_grad()
def test_cached_logits_equal_full_recomputation_at_every_step(model):
    """Prefill (bidirectional image block, rows of different lengths) and each decode step, teacher-forced."""
    batch = prompt_batch(model)
    assert len(set(batch["attention_mask"].sum(1).tolist())) == 3 and bool((batch["mm_token_type_ids"] == 1).any())
    cached, full = CachedDecoder(model, batch), FullDecoder(model, batch)
    alive = torch.ones(3, dtype=torch.bool)
    got, want = cached.start(), full.start()
    for forced in torch.randint(16, 272, (6, 3), generator=torch.Generator().manual_seed(0)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
        got, want = cached.step(forced, alive), full.step(forced, alive)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_greedy_tokens_with_and_without_cache_agree_and_ignore_the_batch(model):
    batch = prompt_batch(model)
    with_cache = greedy_generate(model, batch, max_new_tokens=8)
    assert with_cache == greedy_generate(model, batch, max_new_tokens=8, use_cache=False)
    assert [len(row) for row in with_cache] == [8, 8, 8]
    assert [greedy_generate(model, _row(batch, i), max_new_tokens=8)[0] for i in range(3)] == with_cache


def test_decoder_sees_the_prompt_once_then_one_token_per_step_at_each_rows_position(tiny_gemma4_dir):
    model = sharpened(FusionModel.from_pretrained(tiny_gemma4_dir))
    batch = prompt_batch(model)
    lengths = batch["attention_mask"].sum(1)
    calls = []
    model.backbone.decoder.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((kwargs["inputs_embeds"].shape[1], kwargs["position_ids"])),
        with_kwargs=True)
    greedy_generate(model, batch, max_new_tokens=5)
    assert [width for width, _ in calls] == [int(lengths.max()), 1, 1, 1, 1]
    prefill = calls[0][1]
    for i, n in enumerate(lengths.tolist()):  # left-padded rows: positions restart at 0 on each row's first token
        assert prefill[i, -n:].tolist() == list(range(n))
    for step, (_, positions) in enumerate(calls[1:]):
        assert positions[:, 0].tolist() == (lengths + step).tolist()
    calls.clear()
    greedy_generate(model, batch, max_new_tokens=5, use_cache=False)
    assert len(calls) == 5 and min(width for width, _ in calls) > batch["input_ids"].shape[1] - 1


def test_eos_stops_its_row_only(tiny_gemma4_dir):
    model = sharpened(FusionModel.from_pretrained(tiny_gemma4_dir))
    batch = prompt_batch(model)
    free = generate(model, batch, 8, temperature=3.0, seed=1)
    stop = free[0][3]  # make row 0's fourth token the end of sequence
    model.tokens = dataclasses.replace(model.tokens, eos=stop)
    stopped = generate(model, batch, 8, temperature=3.0, seed=1)
    assert stopped[0] == free[0][: free[0].index(stop)]
    for got, want in zip(stopped[1:], free[1:]):
        assert got == want[: want.index(stop)] if stop in want else got == want


def test_sampling_repeats_with_its_seed_and_differs_with_another(tiny_gemma4_dir):
    model = sharpened(FusionModel.from_pretrained(tiny_gemma4_dir))
    batch = prompt_batch(model)
    first = generate(model, batch, 8, temperature=2.0, seed=7)
    assert generate(model, batch, 8, temperature=2.0, seed=7) == first
    assert generate(model, batch, 8, temperature=2.0, seed=8) != first
    assert generate(model, batch, 8, temperature=2.0, seed=7, use_cache=False) == first
    greedy = greedy_generate(model, batch, 8)
    assert first != greedy
    assert generate(model, batch, 8, temperature=2.0, top_k=1, seed=3) == greedy  # one candidate left: argmax
    assert generate(model, batch, 8, temperature=2.0, top_p=1e-6, seed=3) == greedy


def test_greedy_on_eval_batches_matches_the_uncached_path(tiny_gemma4_dir, demo_dir):
    """What evaluate() scores: the demo's val prompts (image and audio tasks) as prompt_only batches."""
    from gemma_fusion.core.schema import DataConfig
    from gemma_fusion.data.pipeline import make_loader, preprocessor_for
    from gemma_fusion.eval.evaluate import prompt_only

    model = sharpened(FusionModel.from_pretrained(tiny_gemma4_dir))
    loader = make_loader(DataConfig(eval_batch_size=3), preprocessor_for(model, 8, 30), train=False,
                         spec=f"{demo_dir}/val")
    seen = 0
    for batch in loader:
        prompts = prompt_only(batch, model.tokens.pad)
        assert greedy_generate(model, prompts, 6) == greedy_generate(model, prompts, 6, use_cache=False)
        seen += len(batch["meta"])
    assert seen == 6
