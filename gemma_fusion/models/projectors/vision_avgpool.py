"""`avg_pool`: raw patches embedded one by one, the k x k embeddings of a merged patch averaged (Gemma 3's pooling).

The worked example of docs/PROJECTORS.md: a design is this file plus configs/model/vision/avg_pool.yaml.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from gemma_fusion.models.projectors.base import VisionProjector
from gemma_fusion.models.projectors.posemb import make_posemb


class AvgPoolProjector(VisionProjector):
    """Linear -> GELU per raw patch, mean over the k x k raw patches, + 2D position, Linear.

    Signature :: pixel_values [N, P, patch_dim], position_ids [N, P, 2] --> [N, P, out_dim]

    Where pixel_shuffle concatenates the k x k sub-patch embeddings (k^2 x wider), this averages them: the
    token keeps what the sub-patches share, not where each sits (Gemma 3 average-pools its SigLIP tokens 4 x 4).

    Args:
        embed_dim: width of each raw patch's embedding.
        posemb: "table" | "sincos" | "none", added after pooling; posemb_size: rows of the table.
    """

    def __init__(self, out_dim: int, patch_size: int = 16, pooling_kernel_size: int = 3, embed_dim: int = 256,
                 posemb: str = "table", posemb_size: int = 64):
        super().__init__(out_dim, patch_size, pooling_kernel_size)
        self.patch_embed = nn.Linear(3 * patch_size**2, embed_dim)
        self.posemb = make_posemb(posemb, embed_dim, posemb_size)
        self.proj = nn.Linear(embed_dim, out_dim)

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        k, ps = self.pooling_kernel_size, self.patch_size
        x = rearrange(pixel_values.to(self.proj.weight.dtype), "n p (i a j b c) -> n p (i j) (a b c)",
                      i=k, a=ps, j=k, b=ps)  # N, P, patch_dim -> N, P, k*k, 3*ps*ps
        x = F.gelu(self.patch_embed(x)).mean(2)  # N, P, k*k, embed_dim -> N, P, embed_dim
        return self.proj(self.posemb(x, position_ids))  # N, P, out_dim
