"""The projector contract: everything the rest of gemma_fusion may ask of a projector, one base class per modality.

A projector turns one modality's inputs into soft tokens of the backbone's width, one token per merged image
patch or per audio frame. Who asks what (docs/PROJECTORS.md):

    out_dim                    FusionModel checks it equals the backbone's hidden size
    patch_size, pooling_kernel_size, patch_dim | frame_dim
                               data/pipeline.py cuts images / audio to this geometry; compute.py, benches
    soft_tokens(...)           the one way to call a projector (audio: with or without the frame mask)
    idle_inputs(device)        FusionModel runs them when a batch lacks the modality (FSDP: same collectives)
    frozen_modules()           set_trainable keeps them frozen, FSDP gives each its own unit, train() keeps
                               them in eval mode
    gemma4_native              inference/export.py writes the weights as Gemma 4's embed_vision / embed_audio

A design subclasses `VisionProjector` or `AudioProjector`, passes its geometry to `super().__init__` and
implements `forward`; a missing `forward`, a missing or non-positive geometry value, or a submodule named
like a contract member fails at construction. Being `Buildable`, a design may be named by a config's `_target_`.
"""
from __future__ import annotations

import inspect
from abc import ABCMeta, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from gemma_fusion.core.config import Buildable
from gemma_fusion.core.errors import UserError

CONTRACT_MEMBERS = frozenset({"out_dim", "patch_size", "pooling_kernel_size", "patch_dim", "frame_dim", "uses_mask",
                              "soft_tokens", "idle_inputs", "frozen_modules", "gemma4_native"})


class _ChecksAfterInit(ABCMeta):
    """Metaclass of the projectors: runs `_check_contract` once a design's `__init__` has returned."""

    def __call__(cls, *args, **kwargs):
        projector = super().__call__(*args, **kwargs)
        projector._check_contract()
        return projector

    @property
    def __signature__(cls) -> inspect.Signature:
        """The class's own constructor arguments (`inspect.signature(Design)`), not this `__call__`'s."""
        sig = inspect.signature(cls.__init__)
        return sig.replace(parameters=list(sig.parameters.values())[1:])


class Projector(nn.Module, Buildable, metaclass=_ChecksAfterInit):
    """What both modalities declare: the output width, the frozen parts and Gemma 4 weight compatibility.

    Args:
        out_dim: width of every soft token (the backbone's hidden size).
    """

    gemma4_native: ClassVar[bool] = False
    """True when the weights are Gemma 4's own embedder (same names and meaning): export writes them there."""
    geometry: ClassVar[tuple[str, ...]] = ("out_dim",)

    def __init__(self, out_dim: int):
        super().__init__()
        self.out_dim = out_dim

    def frozen_modules(self) -> list[nn.Module]:
        """Parts that never train (e.g. a pretrained encoder tower used as is); none by default."""
        return []

    def train(self, mode: bool = True) -> "Projector":
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()  # frozen parts keep dropout off
        return self

    def _check_contract(self) -> None:
        name = type(self).__name__
        for key in self.geometry:
            value = getattr(self, key, None)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name} has {key}={value!r}, not a positive integer; pass its geometry to "
                                f"super().__init__({', '.join(self.geometry)}) and set it in the projector's config.")
        shadowed = sorted(CONTRACT_MEMBERS & {*self._modules, *self._parameters, *self._buffers})
        if shadowed:
            raise UserError(f"{name} has a submodule, parameter or buffer named {', '.join(shadowed)}, a member of the "
                            "projector contract (gemma_fusion/models/projectors/base.py); rename it.")


class VisionProjector(Projector):
    """Merged image patches and their grid positions -> one soft token per merged patch.

    Signature :: pixel_values [N, P, patch_dim] float in [0, 1], position_ids [N, P, 2] long --> [N, P, out_dim]

    A merged patch is a square of side patch_size * pooling_kernel_size pixels, flattened `(rows cols rgb)`,
    so patch_dim = (patch_size * pooling_kernel_size)^2 * 3. position_ids are (x = column, y = row) in the
    image's grid of merged patches; padding patches are (-1, -1) and their outputs are dropped by FusionModel.

    Args:
        out_dim: width of every soft token (the backbone's hidden size).
        patch_size: side of a raw patch in pixels (16 for Gemma 4).
        pooling_kernel_size: k, raw patches merged k x k into one soft token (3 for Gemma 4).
    """

    geometry = ("out_dim", "patch_size", "pooling_kernel_size")

    def __init__(self, out_dim: int, patch_size: int, pooling_kernel_size: int):
        super().__init__(out_dim)
        self.patch_size, self.pooling_kernel_size = patch_size, pooling_kernel_size
        self.patch_dim = (patch_size * pooling_kernel_size) ** 2 * 3

    @abstractmethod
    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, P, patch_dim], position_ids [N, P, 2] --> [N, P, out_dim]."""

    def soft_tokens(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Soft tokens of `pixel_values` [N, P, patch_dim] at `position_ids` [N, P, 2] --> [N, P, out_dim]."""
        return self(pixel_values, position_ids)

    def idle_inputs(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The arguments of `soft_tokens` for one blank patch at (0, 0): pixel_values [1, 1, patch_dim],
        position_ids [1, 1, 2]."""
        return (torch.zeros(1, 1, self.patch_dim, device=device),
                torch.zeros(1, 1, 2, dtype=torch.long, device=device))

    def _check_contract(self) -> None:
        super()._check_contract()
        if self.patch_dim != (self.patch_size * self.pooling_kernel_size) ** 2 * 3:
            raise UserError(f"{type(self).__name__} has patch_dim={self.patch_dim}, but patch_size "
                            f"{self.patch_size} and pooling_kernel_size {self.pooling_kernel_size} give "
                            f"{(self.patch_size * self.pooling_kernel_size) ** 2 * 3}; leave patch_dim to VisionProjector.")


def _frames_and_mask(projector: "AudioProjector", args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of every AudioProjector: callers pass (frames, mask); forward gets (frames, mask) where
    `uses_mask` (a missing mask: every frame is real), else (frames,)."""
    frames, rest = (args[0], args[1:]) if args else (kwargs.pop("frames"), ())
    mask = rest[0] if rest else kwargs.pop("mask", None)
    if not projector.uses_mask:
        return (frames,), kwargs
    if mask is None:
        mask = torch.ones(frames.shape[:2], dtype=torch.bool, device=frames.device)
    return (frames, mask.bool()), kwargs


class AudioProjector(Projector):
    """Frames of raw 16 kHz samples -> one soft token per frame.

    Signature :: frames [N, T, frame_dim] float, mask [N, T] bool (True = a real frame) --> [N, T, out_dim]

    Every audio projector is called `(frames, mask)` (`soft_tokens`, or the module itself). A design whose
    tokens each see one frame implements `forward(frames)` and keeps `uses_mask = False`: the mask is dropped
    before forward (FusionModel drops the outputs of padding frames). A design that looks across frames (an
    encoder over the clip) sets `uses_mask = True` and implements `forward(frames, mask)`, so that padding
    never reaches real frames. Tokens per second = 16000 / frame_dim.

    Args:
        out_dim: width of every soft token (the backbone's hidden size).
        frame_dim: samples per soft token (640 = 40 ms for Gemma 4).
    """

    uses_mask: ClassVar[bool] = False
    geometry = ("out_dim", "frame_dim")

    def __init__(self, out_dim: int, frame_dim: int):
        super().__init__(out_dim)
        self.frame_dim = frame_dim
        # the mask dispatch runs inside the module call, so a wrapper around the projector (FSDP) keeps it
        self.register_forward_pre_hook(_frames_and_mask, with_kwargs=True)

    @abstractmethod
    def forward(self, frames: torch.Tensor, *mask: torch.Tensor) -> torch.Tensor:
        """frames [N, T, frame_dim] (, mask [N, T] bool where `uses_mask`) --> [N, T, out_dim]."""

    def soft_tokens(self, frames: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Soft tokens of `frames` [N, T, frame_dim] with `mask` [N, T] (None: all real) --> [N, T, out_dim]."""
        return self(frames, mask)

    def idle_inputs(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The arguments of `soft_tokens` for one silent real frame: frames [1, 1, frame_dim], mask [1, 1]."""
        return torch.zeros(1, 1, self.frame_dim, device=device), torch.ones(1, 1, dtype=torch.bool, device=device)
