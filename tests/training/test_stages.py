"""The two-stage recipe: align (projectors only) then finetune (projectors + LoRA) from the first run."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from gemma_fusion.artifacts.load import init_from_run
from gemma_fusion.training import recipe
from gemma_fusion.core.errors import UserError
from gemma_fusion.models.build import build_model


def test_finetune_starts_from_the_align_run(make_cfg, tmp_path):
    align = tmp_path / "align"
    recipe.train(make_cfg("experiment=align", "trainer.max_steps=2"), align)
    aligned = load_file(align / "final" / "trainable.safetensors")
    assert aligned and not any("lora_" in k for k in aligned)  # stage 1 trains no adapters

    cfg = make_cfg("experiment=finetune", f"model.init_from={align}", "trainer.max_steps=2")
    model = build_model(cfg)
    init_from_run(model, cfg.model.init_from)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in aligned.items())  # projectors carried over
    assert any("lora_" in n and p.requires_grad for n, p in params.items())  # stage 2 adds LoRA


def test_finetune_without_a_first_stage_is_refused(make_cfg, tmp_path):
    with pytest.raises(UserError, match="final/trainable.safetensors"):
        init_from_run(build_model(make_cfg("experiment=finetune", f"model.init_from={tmp_path}")), tmp_path)


def _same_losses_and_gradients(make_cfg, option: str, batches: int, atol: float, check=None) -> None:
    """Build the model with `option=false` and `option=true` from the same seed, run `batches` batches
    forward and backward, and compare the losses and the accumulated gradients."""
    from gemma_fusion.core.schema import DataConfig
    from gemma_fusion.data.pipeline import make_loader, preprocessor_for

    results = []
    for flag in (False, True):
        torch.manual_seed(0)
        cfg = make_cfg(f"{option}={str(flag).lower()}")
        model = build_model(cfg).train()
        done = check(model, flag) if check else None
        loader = iter(make_loader(DataConfig(batch_size=4), preprocessor_for(model, 8), train=True, spec=cfg.data.train))
        losses = []
        for _ in range(batches):
            loss = model(**next(loader)).loss
            loss.backward()
            losses.append(loss.detach())
        if done:
            done()
        results.append((torch.stack(losses), {n: p.grad.clone() for n, p in model.named_parameters()
                                              if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, atol=atol) and grads_a.keys() == grads_b.keys() and grads_a
    assert all(torch.allclose(grads_a[k], grads_b[k], atol=atol) for k in grads_a)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(make_cfg):
    def count_calls(model, flag):
        calls = []
        model.backbone.decoder.layers[0].mlp.register_forward_hook(lambda *_: calls.append(1))
        return lambda: len(calls) == (2 if flag else 1) or pytest.fail(f"{len(calls)} calls")  # recomputed once

    _same_losses_and_gradients(make_cfg, "model.gradient_checkpointing", 1, 1e-6, count_calls)


@pytest.mark.slow  # subprocesses or many steps: `pytest -m slow`, its own step in .ci/run
def test_compiled_layers_give_the_same_loss_and_gradients(make_cfg):
    """model.compile=true: inductor-compiled decoder layers (about a minute of compilation on 2 cores); two
    batches of different lengths: one dynamic graph serves both."""
    def compiled(model, flag):
        assert all(layer._compiled_call_impl is not None for layer in model.backbone.decoder.layers) == flag

    _same_losses_and_gradients(make_cfg, "model.compile", 2, 1e-5, compiled)


def test_finetune_without_the_first_stage_is_one_sentence(make_cfg, tmp_path):
    with pytest.raises(UserError, match=r"pass model.init_from=RUN"):
        recipe.train(make_cfg("experiment=finetune"), tmp_path)
