"""`patch_ef`: Gemma 4's encoder-free patch embedder (no ViT).

Pipeline, per merged 48 px patch (6912 raw pixel values):
LayerNorm -> Linear -> LayerNorm -> + P[x, 0] + P[y, 1] -> LayerNorm -> scale-free RMSNorm -> Linear.
Parameter names equal `Gemma4UnifiedVisionEmbedder`'s, so `embed_vision.*` of a Gemma 4 unified
checkpoint loads with `load_state_dict` and exports back unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from gemma_fusion.models.projectors.base import VisionProjector
from gemma_fusion.models.projectors.norms import MultimodalEmbedder
from gemma_fusion.models.projectors.posemb import table_lookup


class PatchEmbedder(VisionProjector):
    """Raw merged patches + 2D positions -> one soft token per patch.

    Signature :: pixel_values [B, P, patch_dim], position_ids [B, P, 2] --> [B, P, out_dim]

    Args:
        patch_size: side of the raw patches in pixels (16 for Gemma 4).
        pooling_kernel_size: k, raw patches merged k x k into one soft token (3 for Gemma 4), so
            patch_dim = (patch_size * k)^2 * 3 raw values per token (6912 for Gemma 4).
        embed_dim: width of the patch embedding and of the position table (`mm_embed_dim`).
        out_dim: the backbone's hidden size.
        posemb_size: rows of the factorised position table (largest x or y + 1).
        eps: epsilon of the scale-free RMSNorm.
    Padding patches carry position (-1, -1): they get no position embedding and are dropped by the
    caller. Gemma 4's own `embed_vision` (`gemma4_native`).
    """

    gemma4_native = True

    def __init__(
        self,
        out_dim: int,
        patch_size: int = 16,
        pooling_kernel_size: int = 3,
        embed_dim: int = 3840,
        posemb_size: int = 1120,
        eps: float = 1e-6,
    ):
        super().__init__(out_dim, patch_size, pooling_kernel_size)
        patch_dim = self.patch_dim
        self.patch_ln1 = nn.LayerNorm(patch_dim)
        self.patch_dense = nn.Linear(patch_dim, embed_dim)
        self.patch_ln2 = nn.LayerNorm(embed_dim)
        self.pos_embedding = nn.Parameter(torch.randn(posemb_size, 2, embed_dim) * 0.02)
        self.pos_norm = nn.LayerNorm(embed_dim)
        self.multimodal_embedder = MultimodalEmbedder(embed_dim, out_dim, eps)

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = pixel_values.to(self.patch_dense.weight.dtype)
        x = self.patch_ln2(self.patch_dense(self.patch_ln1(x)))  # B, P, patch_dim -> B, P, E
        if (position_ids.max() >= self.pos_embedding.shape[0]).item():
            raise ValueError(
                f"An image has a patch position {int(position_ids.max())} but the position table has "
                f"{self.pos_embedding.shape[0]} rows; lower the image token budget or raise posemb_size."
            )
        valid = (position_ids != -1).to(x.dtype).unsqueeze(-1)  # B, P, 2, 1
        pos = (table_lookup(self.pos_embedding, position_ids) * valid).sum(-2)  # B, P, 2, E -> B, P, E
        x = self.pos_norm(x + pos.to(x.dtype))
        return self.multimodal_embedder(x)  # B, P, E -> B, P, out_dim
