"""Projector families, one file each: modality inputs -> backbone embedding width."""
from gemma_fusion.models.projectors.audio_frames import AudioFrameProjector
from gemma_fusion.models.projectors.vision_patch import PatchEmbedder

__all__ = ["AudioFrameProjector", "PatchEmbedder"]
