"""Vision designs for the ablation lab, each a drop-in for `patch_ef` (`model/vision=<name>`).

Every design maps merged patches (side = patch_size * pooling_kernel_size pixels, flattened `(a b c)`
row-major, channels last) and their (x, y) grid positions to ONE soft token per merged patch, so the
data pipeline's token count never changes. Padding patches have position (-1, -1). Geometry, idle inputs
and frozen parts: the `VisionProjector` contract (base.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from transformers import AutoModel

from gemma_fusion.core.errors import UserError
from gemma_fusion.models.projectors.base import VisionProjector
from gemma_fusion.models.projectors.posemb import make_posemb, valid_patches


def row_ends(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, P, 2] -> [B, P] bool: the valid patch with the largest x in its row (y), per image."""
    valid = valid_patches(position_ids)
    col = position_ids[..., 0].long().masked_fill(~valid, -1)
    row = position_ids[..., 1].long().clamp(min=0)  # a grid of R rows has at least R patches: row < P
    last = torch.full_like(col, -1).scatter_reduce(1, row, col, "amax")  # B, P: largest x per row index
    return valid & (col == last.gather(1, row))


class LinearPatchProjector(VisionProjector):
    """`linear` (Fuyu-style): one Linear per merged patch, + 2D position, + a learned row-end vector.

    Signature :: pixel_values [B, P, patch_dim], position_ids [B, P, 2] --> [B, P, out_dim]

    Deviations from Fuyu: Fuyu inserts a newline token after each row of patches, which would change
    the token count the data pipeline planned; here a learned `row_end` vector is added to the last
    valid patch of each row instead. Fuyu has no position embedding: `posemb="none"` is Fuyu's choice.
    """

    def __init__(self, out_dim: int, patch_size: int = 16, pooling_kernel_size: int = 3, posemb: str = "table",
                 posemb_size: int = 64):
        super().__init__(out_dim, patch_size, pooling_kernel_size)
        self.proj = nn.Linear(self.patch_dim, out_dim)
        self.posemb = make_posemb(posemb, out_dim, posemb_size)
        self.row_end = nn.Parameter(torch.randn(out_dim) * 0.02)

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.posemb(self.proj(pixel_values.to(self.proj.weight.dtype)), position_ids)  # B, P, out_dim
        return x + row_ends(position_ids).unsqueeze(-1).to(x.dtype) * self.row_end


class MLPPatchProjector(VisionProjector):
    """`mlp2x_gelu` (LLaVA-1.5-style): Linear -> GELU -> + 2D position -> Linear, per merged patch.

    Signature :: pixel_values [B, P, patch_dim], position_ids [B, P, 2] --> [B, P, out_dim]

    LLaVA's MLP reads CLIP features, which carry their own positions; here it reads raw pixels, so the
    position is added between the two layers (the output layer mixes it with the content).
    """

    def __init__(self, out_dim: int, patch_size: int = 16, pooling_kernel_size: int = 3, posemb: str = "table",
                 posemb_size: int = 64):
        super().__init__(out_dim, patch_size, pooling_kernel_size)
        self.fc1 = nn.Linear(self.patch_dim, out_dim)
        self.posemb = make_posemb(posemb, out_dim, posemb_size)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.fc1(pixel_values.to(self.fc1.weight.dtype)))  # B, P, patch_dim -> B, P, out_dim
        return self.fc2(self.posemb(x, position_ids))


class ConvStemProjector(VisionProjector):
    """`conv_stem` (EVEv2-style): Conv(patch_size) -> GELU -> Conv(k) -> + 2D position -> Linear.

    Signature :: pixel_values [B, P, patch_dim], position_ids [B, P, 2] --> [B, P, out_dim]

    Each merged patch is one (3, side, side) image: the first convolution embeds its k x k raw patches,
    the second merges those k x k into one vector. EVEv2's second convolution merges 2 x 2 across the
    whole image; here it merges the k x k sub-patches of one merged patch, so there is still one token
    per merged patch (48 px for Gemma 4's geometry, EVEv2 uses 32 px).

    Args:
        stem_dim: channels of the first convolution.
        merge_dim: channels of the second (merging) convolution.
    """

    def __init__(self, out_dim: int, patch_size: int = 16, pooling_kernel_size: int = 3, stem_dim: int = 128,
                 merge_dim: int = 256, posemb: str = "table", posemb_size: int = 64):
        super().__init__(out_dim, patch_size, pooling_kernel_size)
        self.side = patch_size * pooling_kernel_size
        self.conv1 = nn.Conv2d(3, stem_dim, kernel_size=patch_size, stride=patch_size)
        self.conv2 = nn.Conv2d(stem_dim, merge_dim, kernel_size=pooling_kernel_size, stride=pooling_kernel_size)
        self.posemb = make_posemb(posemb, merge_dim, posemb_size)
        self.proj = nn.Linear(merge_dim, out_dim)

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = rearrange(pixel_values.to(self.conv1.weight.dtype), "n p (h w c) -> (n p) c h w", h=self.side, w=self.side)
        x = self.conv2(F.gelu(self.conv1(x)))  # (n p), 3, side, side -> (n p), C, k, k -> (n p), C2, 1, 1
        x = rearrange(x, "(n p) c 1 1 -> n p c", n=pixel_values.shape[0])
        return self.proj(self.posemb(x, position_ids))


class PixelShuffleProjector(VisionProjector):
    """`pixel_shuffle` (InternVL / Idefics3-style): sub-patch Linear, space-to-depth k x k, then an MLP.

    Signature :: pixel_values [B, P, patch_dim], position_ids [B, P, 2] --> [B, P, out_dim]

    Each patch_size x patch_size sub-patch is embedded by one shared Linear (3 * ps^2 -> subpatch_dim);
    the k x k embeddings of a merged patch are concatenated (k^2 * subpatch_dim) and projected by
    LayerNorm -> Linear -> GELU -> + 2D position -> Linear. InternVL shuffles ViT features; here a
    Linear stands in for the ViT, so the design stays encoder-free.
    """

    def __init__(self, out_dim: int, patch_size: int = 16, pooling_kernel_size: int = 3, subpatch_dim: int = 64,
                 posemb: str = "table", posemb_size: int = 64):
        super().__init__(out_dim, patch_size, pooling_kernel_size)
        merged = pooling_kernel_size**2 * subpatch_dim
        self.embed = nn.Linear(3 * patch_size**2, subpatch_dim)
        self.norm = nn.LayerNorm(merged)
        self.fc1 = nn.Linear(merged, out_dim)
        self.posemb = make_posemb(posemb, out_dim, posemb_size)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        k, ps = self.pooling_kernel_size, self.patch_size
        x = rearrange(pixel_values.to(self.embed.weight.dtype), "n p (i a j b c) -> n p (i j) (a b c)",
                      i=k, a=ps, j=k, b=ps)  # B, P, patch_dim -> B, P, k*k, 3*ps*ps
        x = rearrange(self.embed(x), "n p s d -> n p (s d)")  # space-to-depth: B, P, k*k*subpatch_dim
        x = F.gelu(self.fc1(self.norm(x)))
        return self.fc2(self.posemb(x, position_ids))


class ViTProjector(VisionProjector):
    """`vit`: a small ViT trained from scratch over the merged patches of each image, then an MLP.

    Signature :: pixel_values [B, P, patch_dim], position_ids [B, P, 2] --> [B, P, out_dim]

    Linear patch embedding (patch_dim -> width) + 2D position -> `depth` pre-norm GELU transformer
    blocks attending across the patches of the same image (padding masked out of the keys) ->
    LayerNorm -> Linear -> GELU -> Linear. Padding patches come out as zeros.
    """

    def __init__(self, out_dim: int, patch_size: int = 16, pooling_kernel_size: int = 3, width: int = 128,
                 depth: int = 2, heads: int = 4, mlp_ratio: int = 4, posemb: str = "table", posemb_size: int = 64):
        super().__init__(out_dim, patch_size, pooling_kernel_size)
        self.embed = nn.Linear(self.patch_dim, width)
        self.posemb = make_posemb(posemb, width, posemb_size)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, mlp_ratio * width, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        padding = ~valid_patches(position_ids)  # B, P
        x = self.posemb(self.embed(pixel_values.to(self.embed.weight.dtype)), position_ids)  # B, P, width
        for block in self.blocks:
            x = block(x, src_key_padding_mask=padding)
        x = self.fc2(F.gelu(self.fc1(self.norm(x))))  # B, P, width -> B, P, out_dim
        return x.masked_fill(padding.unsqueeze(-1), 0.0)


class HFVisionProjector(VisionProjector):
    """`hf_vision`: a transformers vision tower (SigLIP-like) from a local directory, pooled to one token
    per merged patch, then Linear -> GELU -> + 2D position -> Linear.

    Signature :: pixel_values [B, P, patch_dim], position_ids [B, P, 2] --> [B, P, out_dim]

    Each image is reassembled from its merged patches into (3, gh * side, gw * side), normalised with
    the tower's preprocessor mean / std (0.5 / 0.5 when it has none) and run with
    `interpolate_pos_encoding=True` (any grid); images of the same grid share one tower call. The tower's
    patch tokens are average-pooled (side / tower_patch)^2 to one per merged patch, in the input order;
    padding patches come out as zeros. The tower's attention-pooling head (SigLIP) is dropped: unused.

    Args:
        path: local directory of a transformers checkpoint (a vision model, or a model with `.vision_model`).
        trainable: train the tower too; False freezes it (requires_grad False, in `frozen_modules()`, so
            `set_trainable` leaves it frozen and `train()` keeps it in eval mode).
        posemb: extra 2D position before the last Linear; "none" by default (the tower has its own).
    The tower is loaded in float32, like the other projectors.
    """

    def __init__(self, out_dim: int, patch_size: int = 16, pooling_kernel_size: int = 3, *, path: str,
                 trainable: bool = False, posemb: str = "none", posemb_size: int = 64):
        super().__init__(out_dim, patch_size, pooling_kernel_size)
        self.side = patch_size * pooling_kernel_size
        root = Path(path).expanduser()
        if not root.is_dir():
            raise UserError(f"model.vision.path={path} is not a local directory with a transformers vision model.")
        loaded = AutoModel.from_pretrained(root, trust_remote_code=False, dtype=torch.float32)
        tower = getattr(loaded, "vision_model", loaded)
        if getattr(tower, "use_head", False):
            tower.use_head = False
            del tower.head
        self.tower_patch = tower.config.patch_size
        if self.side % self.tower_patch:
            raise UserError(
                f"hf_vision: a merged patch is {self.side} px (patch_size {patch_size} x pooling_kernel_size "
                f"{pooling_kernel_size}) but the tower's patches are {self.tower_patch} px; choose patch_size and "
                f"pooling_kernel_size so that their product is a multiple of {self.tower_patch}."
            )
        mean, std = _norm_stats(root)
        self.register_buffer("mean", torch.tensor(mean).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(3, 1, 1), persistent=False)
        self.tower = tower.requires_grad_(trainable)
        self.trainable = trainable
        self.fc1 = nn.Linear(tower.config.hidden_size, out_dim)
        self.posemb = make_posemb(posemb, out_dim, posemb_size)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def frozen_modules(self) -> list[nn.Module]:
        return [] if self.trainable else [self.tower]

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        valid = valid_patches(position_ids)  # B, P
        img, patch = valid.nonzero(as_tuple=True)  # every valid patch: its image and its index
        col, row = position_ids[img, patch].long().unbind(-1)
        grids = position_ids.amax(1) + 1  # B, 2: (gw, gh) per image
        feats = self.fc1.weight.new_zeros(*valid.shape, self.fc1.in_features)  # B, P, tower width
        for gw, gh in torch.unique(grids, dim=0).tolist():
            same = (grids[img] == grids.new_tensor([gw, gh])).all(-1)  # valid patches of images of this grid
            _, local = torch.unique(img[same], return_inverse=True)  # image -> its row in this group
            cell = row[same] * gw + col[same]
            canvas = pixel_values.new_zeros(int(local.max()) + 1, gh * gw, self.patch_dim)
            canvas[local, cell] = pixel_values[img[same], patch[same]]
            image = rearrange(canvas, "n (gh gw) (a b c) -> n c (gh a) (gw b)", gw=gw, a=self.side, b=self.side)
            tokens = self.tower(pixel_values=(image - self.mean) / self.std, interpolate_pos_encoding=True)
            h, w = gh * self.side // self.tower_patch, gw * self.side // self.tower_patch
            tokens = rearrange(tokens.last_hidden_state[:, -h * w:], "n (h w) d -> n d h w", h=h)  # no CLS token
            pooled = F.avg_pool2d(tokens, self.side // self.tower_patch)  # n, d, gh, gw
            feats[img[same], patch[same]] = rearrange(pooled, "n d gh gw -> n (gh gw) d")[local, cell].to(feats.dtype)
        x = self.posemb(F.gelu(self.fc1(feats)), position_ids)
        return self.fc2(x).masked_fill(~valid.unsqueeze(-1), 0.0)


def _norm_stats(root: Path) -> tuple[list[float], list[float]]:
    """(mean, std) from the checkpoint's preprocessor_config.json; SigLIP's 0.5 / 0.5 when it gives none."""
    config = root / "preprocessor_config.json"
    stats = json.loads(config.read_text()) if config.is_file() else {}
    return list(stats.get("image_mean", [0.5] * 3)), list(stats.get("image_std", [0.5] * 3))
