"""Shared fixtures: tiny random Gemma 4 unified checkpoints saved with save_pretrained (never downloaded)."""
from __future__ import annotations

import pytest
import torch
from transformers import Gemma4UnifiedForConditionalGeneration

from gemma_fusion.models.tiny import tiny_gemma4_config
from gemma_fusion.models.tokenizer import build_byte_tokenizer


def save_tiny_gemma4(path, seed: int = 0, **overrides):
    """Write a random tiny Gemma 4 unified checkpoint + byte tokenizer to `path`; return the HF model."""
    torch.manual_seed(seed)
    model = Gemma4UnifiedForConditionalGeneration(tiny_gemma4_config(**overrides)).eval()
    model.save_pretrained(path)
    build_byte_tokenizer().save_pretrained(path)
    return model


def save_tiny_siglip(path, patch_size: int, image_size: int):
    """Write a random tiny SigLIP vision tower (hidden 32, 1 layer) to `path` and return it."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=image_size, patch_size=patch_size)
    SiglipVisionModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gemma4_dir(tmp_path_factory):
    """A tiny checkpoint with odd widths: vision embed 48 != text 64, audio frames of 320 samples."""
    path = tmp_path_factory.mktemp("tiny_gemma4")
    save_tiny_gemma4(path, mm_embed_dim=48, audio_samples_per_token=320, patch_size=4)
    return path
