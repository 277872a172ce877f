"""The demo's tiny backbone ships in the repository (data/backbones/tiny): it must be the one the recipe makes.

`python train.py` reuses `backbone.path` when its pretrain.json records the recipe of configs/backbone/tiny.yaml and
pretrains again (≈ 2.5 min) otherwise, so a recipe changed without rebuilding the shipped copy would cost every new
user that time silently; and the shipped weights must be a trained backbone, loadable by the real loading code.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from gemma_fusion.core.config import CONFIG_DIR, to_plain
from gemma_fusion.models.backbone import load_backbone
from gemma_fusion.training import pretrain_text
from gemma_fusion.training.pretrain_text import PretrainConfig, ensure_pretrained, make_batch, step_loss


def _tiny_recipe():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train")
    return cfg.backbone.path, PretrainConfig(**to_plain(cfg.backbone.pretrain))


def test_the_shipped_backbone_is_the_recipes_so_the_demo_does_not_pretrain(monkeypatch):
    path, recipe = _tiny_recipe()

    def refuse(*args, **kwargs):
        raise AssertionError(f"{path} does not hold the backbone configs/backbone/tiny.yaml describes; rebuild it: "
                             f"rm -rf {path} && python train.py trainer.max_steps=1, then commit it")

    monkeypatch.setattr(pretrain_text, "pretrain", refuse)
    assert ensure_pretrained(path, recipe) == Path(path)


def test_the_shipped_backbone_reads_the_demo_text_formats():
    """Loaded as a user's checkpoint is (a local directory, tokenizer included), it writes the targets of the demo's
    text-only tasks: a random or half-trained backbone scores near 0 on the 6-character ones."""
    path, recipe = _tiny_recipe()
    loaded = load_backbone(path)
    batch = make_batch(loaded.tokenizer, ["ocr_digits", "ocr_words", "dtmf"], np.random.default_rng(123), 96,
                       recipe.bidirectional_audio)
    with torch.no_grad():
        _, exact = step_loss(loaded.backbone.eval(), batch)
    assert exact.float().mean().item() >= 0.8


def test_slot_noise_perturbs_only_the_slot_embeddings():
    """PretrainConfig.slot_noise: rows without slots give the noiseless loss; rows with slots do not (and 0 is off)."""
    path, _ = _tiny_recipe()
    loaded = load_backbone(path)
    backbone = loaded.backbone.eval()
    batch = make_batch(loaded.tokenizer, ["ocr_words"], np.random.default_rng(5), 8)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        clean, _ = step_loss(backbone, batch)
        assert torch.equal(step_loss(backbone, batch, 0.0, generator)[0], clean)
        noisy, _ = step_loss(backbone, batch, 1.0, generator)
        no_slots = {**batch, "blocks": torch.zeros_like(batch["blocks"])}
        plain_no_slots, _ = step_loss(backbone, no_slots)
        assert torch.equal(step_loss(backbone, no_slots, 1.0, generator)[0], plain_no_slots)
    assert not torch.allclose(noisy, clean)
