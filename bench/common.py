"""Pieces the benchmark scripts share: a FusionModel on an in-memory transformers model, image grids."""
from __future__ import annotations

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def fusion_model(full, lora: bool = True):
    """gemma_fusion's model on a transformers Gemma 4 unified model built in memory: its own embedders as the
    projectors (in float32), LoRA r16 (alpha 32) on every decoder linear layer, trainability set as train.py does."""
    from gemma_fusion.models.backbone import gemma4_spec, split_full_model
    from gemma_fusion.models.fusion import FusionModel
    from gemma_fusion.models.lora import add_lora
    from gemma_fusion.models.trainable import set_trainable

    model = FusionModel.from_loaded(split_full_model(full, gemma4_spec(full.config)))
    for projector in (model.vision, model.audio):
        if projector is not None:
            projector.float()
    if lora:
        add_lora(model.backbone.decoder, 16, 32, 0.0, LORA_TARGETS)
    set_trainable(model)
    return model


def image_grid(n: int) -> tuple[int, int]:
    """(width, height) of an n-token image, as square as n's divisors allow (70 -> 10 x 7, 1120 -> 35 x 32)."""
    width = next(w for w in range(int(n ** 0.5), n + 1) if n % w == 0 and w * w >= n)
    return width, n // width
