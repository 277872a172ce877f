"""Image preprocessing for encoder-free vision tokens (Gemma 4 "unified" recipe).

Reproduces transformers' `Gemma4UnifiedImageProcessor` bit for bit, minus the padding:
aspect-preserving resize to a multiple of `pooling_kernel_size * patch_size`, rescale to
[0, 1] (no mean/std), and a k×k merge of `patch_size` patches into one soft token whose
vector is the (k*p)×(k*p)×3 pixel block in row-major HWC order.

Decoding (`load_image`) follows transformers' RGB conversion (transparency composited on
white) but applies EXIF orientation and scales 16/32-bit and float images by their range,
where Pillow (and so transformers) would clip them at 255.

Speed (bench/loader.py): pixels stay uint8 and HWC end to end, so torch's AVX2 uint8 resize
reads and writes channels_last without layout conversions, and cutting tokens copies whole
(k*p)*3-byte rows. `ImagePreprocessor(jpeg_draft=True)` additionally lets libjpeg decode large
photos at 1/2, 1/4 or 1/8 scale (opt-in: pixels then differ from the processor's).

Size limit: an image over `max_megapixels` (width x height from its header, checked before any pixel is
decoded) is refused as `image_too_large`. It replaces Pillow's global decompression-bomb limits (a warning
past 89 MP, an error past 179 MP), which a user of `train.py` cannot set.
"""

import io
import math
import os
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image, ImageOps, UnidentifiedImageError

from gemma_fusion.core.errors import BadSample, UserError

ImageSource = bytes | bytearray | memoryview | str | os.PathLike | Image.Image

# Errors Pillow raises on corrupt or unsupported data, depending on the format plugin.
_DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error)
_ORIENTATION = 0x0112  # the EXIF tag `exif_transpose` reads
_SWAPS_SIDES = (5, 6, 7, 8)  # orientations that transpose the image
MAX_MEGAPIXELS = 200  # the default of data.max_image_megapixels


def load_image(src: ImageSource, max_megapixels: float = MAX_MEGAPIXELS) -> Image.Image:
    """Decode `src` (encoded bytes, a path, or a PIL image) into an upright 8-bit RGB image.

    EXIF orientation is applied. Modes are converted as in transformers' `convert_to_rgb`:
    images with an alpha band or a `transparency` entry (LA, PA, RGBA, P/L/RGB + tRNS) are
    alpha-composited onto white, everything else (L, 1, P, CMYK, YCbCr, ...) uses Pillow's
    `convert("RGB")`. High-bit-depth modes are first reduced to "L" by `_to_8bit` (16-bit:
    `>> 8`), which is where this deliberately differs from transformers (Pillow clips there).

    Raises:
        BadSample (a UserError, a ValueError): reason `image_undecodable` when the data is not a
            decodable image, `image_too_large` when it has more than `max_megapixels` million pixels.
            Errors reading a path (missing file, permissions) propagate unchanged.
    """
    if isinstance(src, (str, os.PathLike)):
        src = Path(src).read_bytes()
    with _decoding(max_megapixels):
        if isinstance(src, Image.Image):
            _check_size(src.size, max_megapixels)
            src.load()
            image = ImageOps.exif_transpose(src)  # a copy: the caller's image is left alone
        elif isinstance(src, (bytes, bytearray, memoryview)):
            image = _open(src, max_megapixels)
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
        else:
            raise TypeError(f"load_image expects bytes, a path or a PIL image, got {type(src).__name__}.")
    return to_rgb(image)


def load_image_draft(
    src: ImageSource, resized: Callable[[int, int], tuple[int, int]], max_megapixels: float = MAX_MEGAPIXELS
) -> tuple[Image.Image, tuple[int, int]]:
    """`load_image`, but a JPEG is decoded at the smallest DCT scale whose sides stay >= its resize target.

    `resized(height, width)` gives the target (height, width) of the upright full-size image; it is
    returned with the image, so the token grid is the one the full-size decode would give. Pixels
    differ from a full decode + resize (libjpeg's scaled IDCT), hence opt-in. Other formats and
    PIL images are decoded as by `load_image`.
    """
    if isinstance(src, (str, os.PathLike)):
        src = Path(src).read_bytes()
    if not isinstance(src, (bytes, bytearray, memoryview)):
        image = load_image(src, max_megapixels)
        return image, resized(image.height, image.width)
    with _decoding(max_megapixels):
        image = _open(src, max_megapixels)
        swapped = image.getexif().get(_ORIENTATION, 1) in _SWAPS_SIDES  # what exif_transpose will do
        width, height = image.size[::-1] if swapped else image.size
        new_h, new_w = resized(height, width)
        # JPEG only (a no-op elsewhere): scale 1/s with s the largest of 8, 4, 2 that keeps both sides >= target
        image.draft(None, (new_h, new_w) if swapped else (new_w, new_h))
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
    return to_rgb(image), (new_h, new_w)


def _open(data: bytes | bytearray | memoryview, max_megapixels: float) -> Image.Image:
    """`Image.open` reads the header only: an image over the limit is refused before its pixels are decoded."""
    with _pillow_limit(None):  # Pillow would warn here past its own limit; ours is checked just below
        image = Image.open(io.BytesIO(data))
    _check_size(image.size, max_megapixels)
    return image


def _check_size(size: tuple[int, int], max_megapixels: float) -> None:
    width, height = size
    if width * height > max_megapixels * 1e6:
        raise BadSample("image_too_large", (
            f"The image is {width}x{height} ({width * height / 1e6:.1f} megapixels), over the limit of "
            f"{max_megapixels} megapixels; downscale it or raise data.max_image_megapixels."))


def _max_pixels(max_megapixels: float) -> int:
    if not isinstance(max_megapixels, (int, float)) or not 0 < max_megapixels < math.inf:
        raise UserError(f"data.max_image_megapixels must be a positive number (e.g. {MAX_MEGAPIXELS}), got "
                        f"{max_megapixels!r}.")
    return int(max_megapixels * 1e6)


@contextmanager
def _pillow_limit(pixels: int | None) -> Iterator[None]:
    """Pillow's global decompression-bomb limit set to `pixels` (None: off) for the block, restored on any exit.

    A process-wide setting: fine for loader workers (processes), not for threads decoding at once.
    """
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


@contextmanager
def _decoding(max_megapixels: float) -> Iterator[None]:
    """Decode under our limit, Pillow's errors -> `BadSample` with a reason and a fix.

    `_open` checks the header's size; while the pixels are decoded Pillow's own limit is set to ours, so a GIF
    frame or TIFF tile larger than the header said is still bounded (a warning past it, an error past twice it).
    """
    limit = _max_pixels(max_megapixels)
    try:
        with _pillow_limit(limit):
            yield
    except BadSample:
        raise
    except Image.DecompressionBombError as err:
        raise BadSample("image_too_large", (
            f"The image grew past the limit of {max_megapixels} megapixels while decoding ({err}); downscale it "
            "or raise data.max_image_megapixels.")) from err
    except _DECODE_ERRORS as err:
        reason = "format not recognised" if isinstance(err, UnidentifiedImageError) else err
        raise BadSample("image_undecodable", (
            f"Could not decode the image data ({reason}); pass the bytes of a complete file "
            "in a format Pillow reads (JPEG, PNG, WebP, GIF, TIFF, BMP, ...).")) from err


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (see `load_image` for the rules)."""
    image = _to_8bit(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        # Same as transformers.image_transforms.convert_to_rgb: composite onto opaque white.
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    """Reduce 16-bit ("I;16*"), 32-bit ("I") and float ("F") grey to "L" by the value range.

    - I;16*: `v >> 8` (65535 -> 255, 256 -> 1).
    - I: values within [0, 65535] are taken as a 16-bit container (how 16-bit PNG/TIFF often
      decode) and shifted `>> 8`; otherwise the full int32 range is mapped, `(v + 2**31) >> 24`.
    - F: values within [0, 1] are scaled by 255; otherwise Pillow's 0..255 convention is kept
      (clip). Rounded to nearest; NaN becomes 0.
    """
    if image.mode.startswith("I;16"):
        values = np.asarray(image).astype(np.int64)
        if image.mode == "I;16S":
            values = values + 2**15
        grey = values >> 8
    elif image.mode == "I":
        values = np.asarray(image).astype(np.int64)
        in_16bit = values.size == 0 or (values.min() >= 0 and values.max() <= 0xFFFF)
        grey = values >> 8 if in_16bit else (values + 2**31) >> 24
    elif image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
        unit = values.size == 0 or (values.min() >= 0.0 and values.max() <= 1.0)
        grey = np.rint(np.clip(values * 255.0 if unit else values, 0.0, 255.0))
    else:
        return image
    return Image.fromarray(grey.astype(np.uint8), mode="L")


def target_size(
    height: int, width: int, max_soft_tokens: int, patch_size: int = 16, pooling_kernel_size: int = 3
) -> tuple[int, int]:
    """Resized (height, width) for a soft-token budget; both multiples of k*p (k = pooling kernel).

    Same arithmetic as transformers' `get_aspect_ratio_preserving_size` with
    `max_patches = max_soft_tokens * k**2`, for any budget >= 1. One deliberate extension:
    where both sides floor to 0 (budget 1 on a near-square image, by float rounding),
    transformers raises and this returns one soft token, (k*p, k*p).
    """
    if max_soft_tokens < 1:
        raise UserError(f"max_soft_tokens must be >= 1, got {max_soft_tokens}.")
    if height < 1 or width < 1:
        raise UserError(f"Cannot resize an empty image of size {height}x{width}.")
    side = pooling_kernel_size * patch_size
    target_px = max_soft_tokens * pooling_kernel_size**2 * patch_size**2
    factor = math.sqrt(target_px / (height * width))
    new_h = math.floor(factor * height / side) * side
    new_w = math.floor(factor * width / side) * side
    if new_h == 0 and new_w == 0:
        return side, side
    max_side = max_soft_tokens * side
    if new_h == 0:
        new_h, new_w = side, min(math.floor(width / height) * side, max_side)
    elif new_w == 0:
        new_h, new_w = min(math.floor(height / width) * side, max_side), side
    return new_h, new_w


def patchify(
    image: Image.Image | np.ndarray,
    max_soft_tokens: int,
    patch_size: int = 16,
    pooling_kernel_size: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize, rescale and cut an image into one (k*p)²·3 vector per soft token, unpadded.

    Args:
        image: PIL image (any mode, converted by `to_rgb`) or uint8 array [H, W, 3].

    Returns:
        pixel_values: uint8 [N, (k*p)*(k*p)*3]; 6912 wide for p=16, k=3. Pixels stay uint8 until
            the model (4x less memory in the loader); `FusionModel` applies the processor's rescale
            (`uint8 * (1/255)` in float32, `models.fusion.pixels_to_unit`), bit-identical to the
            processor's output. Element order is (row, column, channel) within the (k*p)×(k*p)
            block, as transformers' `patches_merge` produces.
        position_ids: int64 [N, 2], (x, y) = (column, row) of the token on the merged grid;
            tokens are in row-major order.

    The resize is torch's antialiased bicubic on uint8 (`F.interpolate`), the very kernel
    torchvision's `resize` dispatches to on CPU for transformers, so results are identical
    to the processor's non-padding rows. Pillow's bicubic differs by up to ~25/255 on noise.
    """
    pixels = _rgb_pixels(image)
    new_size = target_size(*pixels.shape[:2], max_soft_tokens, patch_size, pooling_kernel_size)
    return _patchify_to(pixels, new_size, pooling_kernel_size * patch_size)


def _rgb_pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        pixels = np.array(to_rgb(image))  # writable copy, H, W, 3
    else:
        pixels = np.asarray(image)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise UserError(f"patchify expects uint8 [H, W, 3] pixels, got {pixels.dtype} {pixels.shape}.")
    return pixels


def _patchify_to(pixels: np.ndarray, new_size: tuple[int, int], side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [H, W, 3] -> resized to `new_size` (multiples of `side`) and cut into side x side tokens."""
    new_h, new_w = new_size
    image = torch.from_numpy(pixels).unsqueeze(0)  # 1, H, W, C
    if (new_h, new_w) != tuple(pixels.shape[:2]):
        # A 1, C, H, W view with true channels_last strides (permute, not einops, whose batch stride of a
        # size-1 dim makes torch pick NCHW output): the uint8 AVX2 kernel then needs no layout conversion
        # on either side and writes 1, H, W, C bytes. Same values either way.
        resized = F.interpolate(image.permute(0, 3, 1, 2), size=(new_h, new_w), mode="bicubic",
                                align_corners=False, antialias=True)
        image = resized.permute(0, 2, 3, 1)  # 1, H, W, C; a contiguous view when channels_last
    else:
        image = image.clone()  # never alias the caller's array

    # 1, H, W, C -> N, (k*p)*(k*p)*C, still uint8: copies runs of side*C contiguous bytes
    pixel_values = rearrange(image, "1 (gh a) (gw b) c -> (gh gw) (a b c)", a=side, b=side).contiguous()

    grid_h, grid_w = new_h // side, new_w // side
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    position_ids = rearrange(torch.stack((cols, rows)), "xy gh gw -> (gh gw) xy")
    return pixel_values, position_ids


@dataclass(frozen=True)
class ImagePreprocessor:
    """Callable `src -> (pixel_values [N, (k*p)²·3], position_ids [N, 2])`: load_image + patchify.

    `jpeg_draft=True` decodes JPEGs with `load_image_draft` (much faster on photos over ~4x the
    target's pixels, not bit-identical to the processor); the token grid is unchanged. Images over
    `max_megapixels` million pixels are refused (`image_too_large`).
    """

    max_soft_tokens: int = 280
    patch_size: int = 16
    pooling_kernel_size: int = 3
    jpeg_draft: bool = False
    max_megapixels: float = MAX_MEGAPIXELS

    def __post_init__(self):
        _max_pixels(self.max_megapixels)  # a bad limit fails here, not on the first image

    def __call__(self, src: ImageSource) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.jpeg_draft:
            image = load_image(src, self.max_megapixels)
            return patchify(image, self.max_soft_tokens, self.patch_size, self.pooling_kernel_size)
        image, new_size = load_image_draft(src, self.target_size, self.max_megapixels)
        return _patchify_to(_rgb_pixels(image), new_size, self.pooling_kernel_size * self.patch_size)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        return target_size(height, width, self.max_soft_tokens, self.patch_size, self.pooling_kernel_size)
