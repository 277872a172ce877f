"""`audio_frames`: Gemma 4's raw-waveform projector (no conformer, no mel).

Each soft token is one frame of raw 16 kHz samples (640 = 40 ms by default), projected by
scale-free RMSNorm -> Linear. Parameter names equal `embed_audio.*` of a Gemma 4 unified checkpoint.
"""
from __future__ import annotations

import torch

from gemma_fusion.models.projectors.norms import MultimodalEmbedder


class AudioFrameProjector(MultimodalEmbedder):
    """Raw waveform frames -> one soft token per frame.

    Signature :: frames [B, T, frame_dim] --> [B, T, out_dim]

    Args:
        frame_dim: samples per frame (`audio_samples_per_token`, 640 for Gemma 4).
        out_dim: the backbone's hidden size.
        eps: epsilon of the scale-free RMSNorm.
    """

    def __init__(self, out_dim: int, frame_dim: int = 640, eps: float = 1e-6):
        super().__init__(frame_dim, out_dim, eps)
        self.frame_dim = frame_dim
        self.out_dim = out_dim

    def idle_inputs(self, device) -> tuple[torch.Tensor]:
        """One silent frame: what the model runs when a batch has no audio (FSDP)."""
        return (torch.zeros(1, 1, self.frame_dim, device=device),)
