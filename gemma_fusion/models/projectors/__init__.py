"""Projector families, one file each: modality inputs -> backbone embedding width.

The contract every design implements: base.py (`VisionProjector`, `AudioProjector`; docs/PROJECTORS.md).
Vision (`model/vision=`): patch_ef (Gemma 4) and the designs in vision_designs.py; audio (`model/audio=`):
audio_frames (Gemma 4) and the designs in audio_designs.py.
"""
from gemma_fusion.models.projectors.audio_designs import (FrameStackProjector, HFAudioProjector,
                                                          MelConformerProjector, SincFilterbankProjector,
                                                          WaveConvProjector)
from gemma_fusion.models.projectors.audio_frames import AudioFrameProjector
from gemma_fusion.models.projectors.base import AudioProjector, Projector, VisionProjector
from gemma_fusion.models.projectors.vision_designs import (ConvStemProjector, HFVisionProjector, LinearPatchProjector,
                                                           MLPPatchProjector, PixelShuffleProjector, ViTProjector)
from gemma_fusion.models.projectors.vision_patch import PatchEmbedder

__all__ = ["AudioFrameProjector", "AudioProjector", "ConvStemProjector", "FrameStackProjector", "HFAudioProjector",
           "HFVisionProjector", "LinearPatchProjector", "MLPPatchProjector", "MelConformerProjector", "PatchEmbedder",
           "PixelShuffleProjector", "Projector", "SincFilterbankProjector", "ViTProjector", "VisionProjector", "WaveConvProjector"]
