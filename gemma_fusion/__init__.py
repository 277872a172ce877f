"""gemma_fusion: early-fusion (encoder-free) multimodal training on frozen language models.

`FusionModel` and `FusionOutput` load on first use, so that `import gemma_fusion.data` (or `.core`) does not
pull in transformers and every projector.
"""
from __future__ import annotations

__all__ = ["FusionModel", "FusionOutput"]


def __getattr__(name: str):
    if name in __all__:
        from gemma_fusion.models import fusion  # lazily: transformers is heavy, and data/ code never needs it

        return getattr(fusion, name)
    raise AttributeError(f"module 'gemma_fusion' has no attribute {name!r}")
