"""The two-stage recipe: align (projectors only) then finetune (projectors + LoRA) from the first run."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import train as train_script
from gemma_fusion.errors import UserError
from gemma_fusion.models.build import build_model


def test_finetune_starts_from_the_align_run(make_cfg, tmp_path):
    align = tmp_path / "align"
    train_script.train(make_cfg("experiment=align", "trainer.max_steps=2"), align)
    aligned = load_file(align / "final" / "trainable.safetensors")
    assert aligned and not any("lora_" in k for k in aligned)  # stage 1 trains no adapters

    cfg = make_cfg("experiment=finetune", f"model.init_from={align}", "trainer.max_steps=2")
    model = build_model(cfg)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in aligned.items())  # projectors carried over
    assert any("lora_" in n and p.requires_grad for n, p in params.items())  # stage 2 adds LoRA


def test_finetune_without_a_first_stage_is_refused(make_cfg, tmp_path):
    with pytest.raises(UserError, match="final/trainable.safetensors"):
        build_model(make_cfg("experiment=finetune", f"model.init_from={tmp_path}"))
