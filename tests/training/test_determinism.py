"""The same seed gives the same numbers: two runs of one command log the same losses and save the same weights, bit
for bit (issue 16; a run killed twice and resumed: tests/training/test_faults.py, which compares exactly too)."""
from __future__ import annotations

import csv

import pytest
import torch
from safetensors.torch import load_file

from gemma_fusion.core.errors import UserError
from gemma_fusion.models.projectors.posemb import table_lookup
from gemma_fusion.training import recipe

# The demo's designs (patch_ef, sinc_fbank, all_linear_r32) at tiny sizes, but with a position table wide enough
# (embed 512: 4 images x 8 patches x 2 axes x 512 = 32768 gradient elements) for its backward to reach the kernels that
# split the work across threads (ATen's grain: 32768 elements), where the old lookup's atomic adds made runs drift.
DEMO = ("trainer.max_steps=30", "eval_after_train=false", "seed=3", "data.shuffle_buffer=8",
        "model.vision.embed_dim=512")


@pytest.fixture
def two_threads():
    """At least two intra-op threads (as on the 2-core machine the issue was found on), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    yield
    torch.set_num_threads(threads)


def _losses(run_dir) -> list[tuple[int, str]]:
    with (run_dir / "metrics.csv").open(newline="") as f:
        return [(int(r["step"]), r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def test_two_runs_with_one_seed_give_identical_losses_and_weights(make_cfg, tmp_path, two_threads):
    for name in ("a", "b"):
        recipe.train(make_cfg(*DEMO), tmp_path / name)

    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert [s for s, _ in a] == list(range(30))
    different = [(s, x, y) for (s, x), (_, y) in zip(a, b) if x != y]
    assert not different, f"(step, loss of run a, loss of run b): {different[:5]}"
    wa, wb = (load_file(tmp_path / name / "final" / "trainable.safetensors") for name in ("a", "b"))
    assert wa.keys() == wb.keys() and any(k.startswith("vision.pos_embedding") for k in wa)
    differ = {k: (wa[k] - wb[k]).abs().max().item() for k in wa if not torch.equal(wa[k], wb[k])}
    assert not differ, f"trainable weights differ (max |a - b|): {differ}"


def test_the_table_lookup_reads_and_trains_the_rows_that_indexing_does():
    """The deterministic lookup against plain advanced indexing (P[x, 0], P[y, 1]): same rows, same gradient."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(6, 2, 5, generator=g, requires_grad=True)
    pos = torch.randint(0, 6, (3, 7, 2), generator=g)  # repeated positions: rows receive several gradients
    pos[0, -2:] = -1  # padding reads row 0 (the caller masks it)
    weights = torch.randn(3, 7, 2, 5, generator=g)
    (reference,) = torch.autograd.grad((table[pos.clamp(min=0), torch.arange(2)] * weights).sum(), table)
    rows = table_lookup(table, pos)
    (grad,) = torch.autograd.grad((rows * weights).sum(), table)
    assert torch.equal(rows, table[pos.clamp(min=0), torch.arange(2)])
    torch.testing.assert_close(grad, reference, rtol=0, atol=1e-6)


def test_trainer_deterministic_trains_with_torchs_deterministic_algorithms(make_cfg, tmp_path):
    """Lightning switches them on; every op of a training step has a deterministic CPU kernel (none raises)."""
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        recipe.train(make_cfg("trainer.deterministic=true", "trainer.max_steps=2", "eval_after_train=false"),
                     tmp_path / "run")
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(was)
    with pytest.raises(UserError, match=r"trainer.deterministic=sometimes is out of range: it must be null, true, "):
        recipe.setup(make_cfg("trainer.deterministic=sometimes"), tmp_path / "bad")
