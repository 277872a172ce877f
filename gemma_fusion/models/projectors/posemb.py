"""2D position embeddings of merged patches, added in place: learned table, fixed sin-cos, or none.

Positions are (x = column, y = row) per patch; padding patches carry (-1, -1) and get nothing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def valid_patches(position_ids: torch.Tensor) -> torch.Tensor:
    """[..., 2] positions -> [...] bool: True for real patches, False for padding (-1)."""
    return (position_ids != -1).all(-1)


def table_lookup(table: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Rows P[x, 0] and P[y, 1] of a factorised table [size, 2, dim] -> [..., 2, dim] (padding reads row 0: mask it).

    Signature :: table [size, 2, dim], position_ids [..., 2] --> [..., 2, dim]

    A lookup (`F.embedding`), not `table[x, axes]`: on CPU the backward of advanced indexing (index_put_ with
    accumulate) adds into repeated rows atomically from several threads, in an order that changes from run to run,
    so two runs with one seed drifted apart (issue 16); embedding's backward sums each row on one thread, in order.
    """
    rows = position_ids.clamp(min=0).long() * 2 + torch.arange(2, device=position_ids.device)  # ..., 2: 2x + 0, 2y + 1
    return F.embedding(rows, table.flatten(0, 1))  # size * 2, dim -> ..., 2, dim


class TablePosemb(nn.Module):
    """Factorised learned table, as Gemma 4's embedder: x + P[x, 0] + P[y, 1].

    Signature :: x [B, P, dim], position_ids [B, P, 2] --> [B, P, dim]
    """

    def __init__(self, dim: int, size: int = 64):
        super().__init__()
        self.table = nn.Parameter(torch.randn(size, 2, dim) * 0.02)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        size = self.table.shape[0]
        if (position_ids.max() >= size).item():
            raise ValueError(
                f"An image has a patch position {int(position_ids.max())} but the position table has {size} rows; "
                "lower the image token budget or raise posemb_size."
            )
        valid = valid_patches(position_ids).unsqueeze(-1)  # B, P, 1
        pos = table_lookup(self.table, position_ids).sum(-2)  # B, P, 2, dim -> B, P, dim
        return x + (pos * valid).to(x.dtype)


class SinCosPosemb(nn.Module):
    """Fixed 2D sin-cos: the first half of the channels encode x, the second half y (MAE / SigLIP 2 style).

    Signature :: x [B, P, dim], position_ids [B, P, 2] --> [B, P, dim]
    """

    def __init__(self, dim: int, temperature: float = 10000.0):
        super().__init__()
        if dim % 4:
            raise ValueError(f"sincos position embeddings need a width divisible by 4, got {dim}.")
        omega = temperature ** -(torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
        self.register_buffer("omega", omega, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        angles = position_ids.clamp(min=0).float().unsqueeze(-1) * self.omega  # B, P, 2, dim/4
        pos = torch.cat((angles.sin(), angles.cos()), -1).flatten(-2)  # B, P, 2, dim/2 -> B, P, dim
        return x + (pos * valid_patches(position_ids).unsqueeze(-1)).to(x.dtype)


class NoPosemb(nn.Module):
    """No position: the identity (the design sees patch content only)."""

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return x


def make_posemb(kind: str, dim: int, size: int = 64) -> nn.Module:
    """`kind` = "table" | "sincos" | "none" -> the module that adds it to [B, P, dim] features."""
    if kind == "table":
        return TablePosemb(dim, size)
    if kind == "sincos":
        return SinCosPosemb(dim)
    if kind == "none":
        return NoPosemb()
    raise ValueError(f"posemb={kind!r} is not one of 'table', 'sincos', 'none'.")
