"""Every `model/vision=<name>` config trains end to end on the tiny backbone and saves its vision parameters."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import save_tiny_siglip

from gemma_fusion.training import recipe
from gemma_fusion.core.config import CONFIG_DIR
from gemma_fusion.models.build import build_model

VISION_CONFIGS = sorted(p.stem for p in (Path(CONFIG_DIR) / "model" / "vision").glob("*.yaml"))


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    """A tiny random SigLIP tower with 4 px patches: the tiny backbone's 12 px tokens pool 3 x 3 of them."""
    return save_tiny_siglip(tmp_path_factory.mktemp("siglip"), patch_size=4, image_size=16)


def vision_cfg(make_cfg, name, siglip_dir, *overrides):
    path = [f"model.vision.path={siglip_dir}"] if name == "hf_vision" else []
    return make_cfg(f"model/vision={name}", "trainer.max_steps=2", *path, *overrides)


def test_every_vision_config_is_covered():
    assert {"none", "patch_ef", "linear", "mlp2x_gelu", "conv_stem", "pixel_shuffle", "vit",
            "hf_vision"} <= set(VISION_CONFIGS)


@pytest.mark.parametrize("name", VISION_CONFIGS)
def test_vision_design_trains_and_saves_its_parameters(name, make_cfg, siglip_dir, tmp_path):
    cfg = vision_cfg(make_cfg, name, siglip_dir)
    L.seed_everything(cfg.seed)  # train() seeds the same way before it builds: `before` is its starting point
    before = {n: p.detach().clone() for n, p in build_model(cfg).named_parameters() if n.startswith("vision.")}
    trained = recipe.train(cfg, tmp_path)

    saved = load_file(tmp_path / "final" / "trainable.safetensors")
    assert set(saved) == {n for n, p in trained.named_parameters() if p.requires_grad}
    vision = {k for k in saved if k.startswith("vision.")}
    if name == "none":
        assert trained.vision is None and not vision
        return
    assert vision and any(not torch.equal(saved[k], before[k]) for k in vision)
    assert trained.vision.out_dim == trained.backbone.hidden_size
    if name == "hf_vision":  # trainable: false -> the tower is neither trained nor saved
        assert not any(k.startswith("vision.tower.") for k in vision)


def test_a_trainable_hf_tower_trains_and_is_saved(make_cfg, siglip_dir, tmp_path):
    recipe.train(vision_cfg(make_cfg, "hf_vision", siglip_dir, "model.vision.trainable=true"), tmp_path)
    saved = load_file(tmp_path / "final" / "trainable.safetensors")
    assert any(k.startswith("vision.tower.") for k in saved) and "vision.fc1.weight" in saved


def test_a_frozen_hf_tower_stays_frozen_in_the_fusion_model(make_cfg, siglip_dir):
    model = build_model(vision_cfg(make_cfg, "hf_vision", siglip_dir))
    tower = [p.requires_grad for n, p in model.named_parameters() if n.startswith("vision.tower.")]
    assert tower and not any(tower)  # set_trainable keeps the projector's frozen_modules() out of training
    assert all(p.requires_grad for n, p in model.vision.named_parameters() if not n.startswith("tower."))


def test_a_tower_without_its_path_is_one_sentence(make_cfg):
    from gemma_fusion.core.errors import UserError

    with pytest.raises(UserError, match=r"model/vision: .*path must be set"):
        build_model(make_cfg("model/vision=hf_vision"))
