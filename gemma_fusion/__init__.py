"""gemma_fusion: early-fusion (encoder-free) multimodal training on frozen language models."""
from gemma_fusion.models.fusion import FusionModel, FusionOutput

__all__ = ["FusionModel", "FusionOutput"]
