"""`audio_frames`: Gemma 4's raw-waveform projector (no conformer, no mel).

Each soft token is one frame of raw 16 kHz samples (640 = 40 ms by default), projected by
scale-free RMSNorm -> Linear. Parameter names equal `embed_audio.*` of a Gemma 4 unified checkpoint.
"""
from __future__ import annotations

import torch
from torch import nn

from gemma_fusion.models.projectors.base import AudioProjector
from gemma_fusion.models.projectors.norms import ScaleFreeRMSNorm


class AudioFrameProjector(AudioProjector):
    """Raw waveform frames -> one soft token per frame: Gemma 4's own `embed_audio` (`gemma4_native`).

    Signature :: frames [B, T, frame_dim] --> [B, T, out_dim]

    Args:
        frame_dim: samples per frame (`audio_samples_per_token`, 640 for Gemma 4).
        out_dim: the backbone's hidden size.
        eps: epsilon of the scale-free RMSNorm.
    """

    gemma4_native = True

    def __init__(self, out_dim: int, frame_dim: int = 640, eps: float = 1e-6):
        super().__init__(out_dim, frame_dim)
        self.embedding_pre_projection_norm = ScaleFreeRMSNorm(eps)  # the names of Gemma 4's MultimodalEmbedder
        self.embedding_projection = nn.Linear(frame_dim, out_dim, bias=False)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames.to(self.embedding_projection.weight.dtype)
        return self.embedding_projection(self.embedding_pre_projection_norm(x))  # B, T, frame_dim -> B, T, out_dim
