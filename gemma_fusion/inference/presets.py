"""Named backbone architectures without weights: Gemma 4 12B "unified" and the project's tiny backbones.

Each preset is a real transformers `Gemma4UnifiedConfig`, the class a checkpoint's config.json loads into,
so the memory planner (`python -m gemma_fusion.plan`) counts a preset exactly as it counts a directory.
"""
from __future__ import annotations

import inspect
from pathlib import Path

from omegaconf import OmegaConf
from transformers import Gemma4UnifiedConfig

from gemma_fusion.core.config import CONFIG_DIR
from gemma_fusion.models.tiny import tiny_gemma4_config

# docs: REFERENCE "Gemma 4 12B". Sliding layers: head_dim 256, 8 KV heads, window 1024, RoPE 1e4; every 6th
# layer global: head_dim 512, 1 KV head, K = V, partial RoPE 0.25 at 1e6 (the class's default rope_parameters).
# max_position_embeddings is left at the class default (262,144).
GEMMA4_12B_TEXT = dict(
    vocab_size=262_144, hidden_size=3840, intermediate_size=15_360, num_hidden_layers=48,
    num_attention_heads=16, num_key_value_heads=8, head_dim=256, sliding_window=1024,
    global_head_dim=512, num_global_key_value_heads=1, attention_k_eq_v=True,
    final_logit_softcapping=30.0, tie_word_embeddings=True,
)
GEMMA4_12B_VISION = dict(patch_size=16, pooling_kernel_size=3, mm_embed_dim=3840, mm_posemb_size=1120,
                         output_proj_dims=3840)  # 48 px merged patches: 6912 -> 3840
GEMMA4_12B_AUDIO = dict(audio_embed_dim=640)  # 40 ms frames of 16 kHz audio: 640 -> 3840


def gemma4_12b_config() -> Gemma4UnifiedConfig:
    """The 12B unified architecture (48 layers, hidden 3840, vocabulary 262,144; about 11.96B parameters)."""
    return Gemma4UnifiedConfig(text_config=dict(GEMMA4_12B_TEXT), vision_config=dict(GEMMA4_12B_VISION),
                               audio_config=dict(GEMMA4_12B_AUDIO))


def tiny_preset_names() -> list[str]:
    """Every configs/backbone/*.yaml that carries a `pretrain:` recipe (tiny, tiny_s, tiny_m, ...)."""
    return sorted(p.stem for p in Path(CONFIG_DIR, "backbone").glob("*.yaml")
                  if OmegaConf.load(p).get("pretrain") is not None)


def tiny_preset_config(name: str) -> Gemma4UnifiedConfig:
    """The architecture of configs/backbone/<name>.yaml's `pretrain:` node, built as the pretraining builds it."""
    pretrain = OmegaConf.load(Path(CONFIG_DIR, "backbone", f"{name}.yaml")).pretrain
    arch = set(inspect.signature(tiny_gemma4_config).parameters)
    return tiny_gemma4_config(**{k: v for k, v in pretrain.items() if k in arch})


def preset_names() -> list[str]:
    return ["gemma4_12b", *tiny_preset_names()]


def preset_config(name: str) -> Gemma4UnifiedConfig | None:
    """The named preset's config, or None when `name` is not a preset."""
    if name == "gemma4_12b":
        return gemma4_12b_config()
    if name in tiny_preset_names():
        return tiny_preset_config(name)
    return None
