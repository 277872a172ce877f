"""Norm and output-projection pieces shared by the Gemma-4-style projectors."""
from __future__ import annotations

import torch
from torch import nn


class ScaleFreeRMSNorm(nn.Module):
    """RMSNorm without a learned scale, computed in float32 (Gemma 4's `with_scale=False`).

    Signature :: [..., dim] --> [..., dim]
    """

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        return out.type_as(x)


class MultimodalEmbedder(nn.Module):
    """Scale-free RMSNorm -> Linear(in_dim -> out_dim, no bias): Gemma 4's `Gemma4UnifiedMultimodalEmbedder`.

    Parameter names (`embedding_projection.weight`) equal the checkpoint's.
    Signature :: [..., in_dim] --> [..., out_dim]
    """

    def __init__(self, in_dim: int, out_dim: int, eps: float = 1e-6):
        super().__init__()
        self.embedding_pre_projection_norm = ScaleFreeRMSNorm(eps)
        self.embedding_projection = nn.Linear(in_dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.embedding_projection.weight.dtype)
        return self.embedding_projection(self.embedding_pre_projection_norm(x))
