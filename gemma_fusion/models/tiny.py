"""Tiny Gemma-4-unified configurations for tests and the CPU demo (real classes, small widths)."""
from __future__ import annotations

from transformers import Gemma4UnifiedConfig

from gemma_fusion.models.tokenizer import SPECIALS, VOCAB_SIZE, special_id


def tiny_gemma4_config(
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int = 16,
    intermediate_size: int = 128,
    vocab_size: int = VOCAB_SIZE,
    patch_size: int = 16,
    pooling_kernel_size: int = 3,
    mm_embed_dim: int | None = None,
    mm_posemb_size: int = 64,
    audio_samples_per_token: int = 640,
    sliding_window: int = 512,
    final_logit_softcapping: float | None = 30.0,
) -> Gemma4UnifiedConfig:
    """A Gemma 4 unified config with the byte tokenizer's special ids; layer types follow Gemma 4's 5:1 rule."""
    mm_embed_dim = mm_embed_dim or hidden_size
    layer_types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(num_hidden_layers)]
    layer_types[-1] = "full_attention"  # Gemma 4 ends on a global layer
    text = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, head_dim=head_dim, global_head_dim=2 * head_dim,
        sliding_window=sliding_window, final_logit_softcapping=final_logit_softcapping,
        pad_token_id=special_id("<pad>"), eos_token_id=special_id("<eos>"), bos_token_id=special_id("<bos>"),
        max_position_embeddings=4096, layer_types=layer_types,
    )
    vision = dict(patch_size=patch_size, pooling_kernel_size=pooling_kernel_size, mm_embed_dim=mm_embed_dim,
                  output_proj_dims=mm_embed_dim, mm_posemb_size=mm_posemb_size)
    return Gemma4UnifiedConfig(
        text_config=text, vision_config=vision, audio_config=dict(audio_embed_dim=audio_samples_per_token),
        boi_token_id=special_id("<boi>"), eoi_token_id=special_id("<eoi>"), image_token_id=special_id("<image>"),
        boa_token_id=special_id("<boa>"), eoa_token_index=special_id("<eoa>"), audio_token_id=special_id("<audio>"),
        video_token_id=len(SPECIALS),  # first reserved id: video is not used
    )
