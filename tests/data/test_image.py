"""Tests for gemma_fusion.data.image: parity with transformers' Gemma4UnifiedImageProcessor.

Tolerance: pixel values are compared EXACTLY (max abs diff measured 0.0 on every case). We call
the same kernel transformers reaches on CPU (torch's antialiased bicubic on uint8, via
torchvision's resize) and the same `uint8 * (1/255)` rescale. Pillow's bicubic would differ by
up to 25/255 on noise, which is why it is not used.
"""

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.gemma4_unified.image_processing_gemma4_unified import (
    Gemma4UnifiedImageProcessor,
    get_aspect_ratio_preserving_size,
)

from gemma_fusion.data.image import ImagePreprocessor, load_image, load_image_draft, patchify, target_size
from gemma_fusion.core.errors import BadSample
from gemma_fusion.models.fusion import pixels_to_unit
from tests.data.awkward_media import _bomb_png


@pytest.fixture(scope="module")
def processor():
    return Gemma4UnifiedImageProcessor()


def _noise_and_gradient(height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 [H, W, 3]: left half random noise, right half smooth gradients."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    ys, xs = np.mgrid[0:height, 0:width]
    gradient = np.stack([xs * 255 // max(width - 1, 1), ys * 255 // max(height - 1, 1), (xs + ys) % 256], -1)
    image[:, width // 2 :] = gradient[:, width // 2 :]
    return image


def _assert_parity(processor, image: Image.Image, ours: tuple[torch.Tensor, torch.Tensor], budget: int):
    """Our unpadded output equals the processor's first num_soft_tokens rows, exactly."""
    ref = processor(image, max_soft_tokens=budget, return_tensors="pt")
    n = int(ref["num_soft_tokens_per_image"][0])
    pixel_values, position_ids = ours
    assert pixel_values.shape == (n, 6912) and pixel_values.dtype == torch.uint8
    assert position_ids.shape == (n, 2) and position_ids.dtype == torch.long
    assert torch.equal(position_ids, ref["image_position_ids"][0, :n])
    assert torch.equal(pixels_to_unit(pixel_values), ref["pixel_values"][0, :n])  # max abs diff 0.0
    assert 1 <= n <= budget


@pytest.mark.parametrize("budget", [70, 280])
@pytest.mark.parametrize("height,width", [(480, 640), (1000, 333), (50, 2000), (2000, 50), (1, 1), (96, 144),
                                          (10, 1000), (1000, 10)])
def test_rgb_parity(processor, height, width, budget):
    image = Image.fromarray(_noise_and_gradient(height, width))
    _assert_parity(processor, image, patchify(image, budget), budget)


def _mode_images() -> dict[str, Image.Image]:
    rgb = Image.fromarray(_noise_and_gradient(90, 120, seed=1))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.random.default_rng(2).integers(0, 256, (90, 120), dtype=np.uint8)))
    palette = rgb.quantize(16)
    palette_transparent = palette.copy()
    palette_transparent.info["transparency"] = 3
    return {
        "L": rgb.convert("L"),
        "1": rgb.convert("1"),
        "LA": rgba.convert("LA"),
        "P": palette,
        "P+transparency": palette_transparent,
        "RGBA": rgba,
        "CMYK": rgb.convert("CMYK"),
    }


@pytest.mark.parametrize("mode", list(_mode_images()))
def test_mode_parity(processor, mode):
    """Non-RGB modes convert exactly as transformers' convert_to_rgb (alpha composited on white)."""
    image = _mode_images()[mode]
    _assert_parity(processor, image, patchify(load_image(image), 70), 70)


def test_16bit_parity_after_scaling(processor):
    """16-bit grey is scaled >> 8 by us (transformers would clip at 255); from RGB on, parity."""
    grey = np.random.default_rng(3).integers(0, 65536, (64, 80), dtype=np.uint16)
    loaded = load_image(Image.fromarray(grey))
    assert np.array_equal(np.asarray(loaded)[..., 0], (grey >> 8).astype(np.uint8))
    _assert_parity(processor, loaded, patchify(Image.fromarray(grey), 70), 70)


def test_mode_values():
    def rgb(image: Image.Image) -> list:
        return np.asarray(load_image(image)).reshape(-1, 3).tolist()

    assert rgb(Image.fromarray(np.array([[0, 255, 256, 65535]], dtype=np.uint16))) == [
        [0, 0, 0], [0, 0, 0], [1, 1, 1], [255, 255, 255]
    ]
    # mode "I": a 16-bit container when all values fit in [0, 65535], else the full int32 range
    assert rgb(Image.fromarray(np.array([[0, 256, 65535]], dtype=np.int32))) == [[0] * 3, [1] * 3, [255] * 3]
    assert rgb(Image.fromarray(np.array([[-(2**31), 0, 2**31 - 1]], dtype=np.int32))) == [
        [0] * 3, [128] * 3, [255] * 3
    ]
    assert rgb(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))) == [[0] * 3, [128] * 3, [255] * 3]
    assert rgb(Image.new("CMYK", (1, 1), (255, 0, 0, 0))) == [[0, 255, 255]]
    assert rgb(Image.new("RGBA", (1, 1), (255, 0, 0, 0))) == [[255, 255, 255]]  # transparent -> white
    assert rgb(Image.new("RGBA", (1, 1), (255, 0, 0, 128))) == [[255, 127, 127]]
    assert rgb(Image.new("LA", (1, 1), (40, 255))) == [[40, 40, 40]]

    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 10, 20, 30])
    palette.putpixel((1, 0), 1)
    assert rgb(palette) == [[0, 0, 0], [10, 20, 30]]
    palette.info["transparency"] = 1
    assert rgb(palette) == [[0, 0, 0], [255, 255, 255]]


def test_exif_orientation():
    """Orientation 6 (rotate 90° clockwise to display): 4x2 becomes 2x4, top-left -> top-right."""
    image = Image.new("RGB", (4, 2))
    image.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, "PNG", exif=exif)
    loaded = load_image(buffer.getvalue())
    assert loaded.size == (2, 4)
    assert loaded.getpixel((1, 0)) == (255, 0, 0) and loaded.getpixel((0, 0)) == (0, 0, 0)


def test_bad_bytes():
    with pytest.raises(ValueError, match="Could not decode the image data"):
        load_image(b"definitely not an image")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, "PNG")
    with pytest.raises(ValueError, match="Could not decode the image data"):
        load_image(buffer.getvalue()[:60])  # truncated


@pytest.fixture(scope="module")
def over_100_megapixels() -> dict[str, bytes]:
    """A 12000x9000 (108 MP) grey gradient as JPEG (1.4 MB) and PNG (0.5 MB): past Pillow's 89.5 MP warning."""
    image = Image.linear_gradient("L").resize((12000, 9000))
    encoded = {}
    for fmt, options in (("JPEG", {"quality": 80}), ("PNG", {"compress_level": 1})):
        buffer = io.BytesIO()
        image.save(buffer, fmt, **options)
        encoded[fmt] = buffer.getvalue()
    return encoded


@pytest.mark.parametrize("fmt,jpeg_draft", [("JPEG", False), ("JPEG", True), ("PNG", False)])
def test_an_image_over_100_megapixels_is_tokenized_without_pillow_bomb_warnings(over_100_megapixels, fmt, jpeg_draft):
    before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        pixel_values, position_ids = ImagePreprocessor(280, jpeg_draft=jpeg_draft)(over_100_megapixels[fmt])
    grid_h, grid_w = (side // 48 for side in target_size(9000, 12000, 280))
    assert pixel_values.shape == (grid_h * grid_w, 6912) and grid_h * grid_w <= 280
    assert position_ids.tolist() == [[x, y] for y in range(grid_h) for x in range(grid_w)]
    assert Image.MAX_IMAGE_PIXELS == before


@pytest.mark.parametrize("jpeg_draft", [False, True])
def test_an_image_over_the_limit_is_refused_and_names_the_setting(over_100_megapixels, jpeg_draft):
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(BadSample, match=r"12000x9000 \(108.0 megapixels\), over the limit of 50 megapixels.*"
                                        r"data.max_image_megapixels") as refused:
        ImagePreprocessor(280, jpeg_draft=jpeg_draft, max_megapixels=50)(over_100_megapixels["JPEG"])
    assert refused.value.reason == "image_too_large"
    assert Image.MAX_IMAGE_PIXELS == before


def test_our_limit_replaces_pillows_global_one(monkeypatch):
    """Under our limit an image decodes whatever Pillow's global says; over it, it is refused; the global is
    left as it was, also after errors."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow alone would refuse 10000 px (> 2 * 1000)
    image = Image.new("RGB", (100, 100), (9, 8, 7))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    for src in (buffer.getvalue(), image):
        assert load_image(src).size == (100, 100)
        with pytest.raises(BadSample, match=r"100x100 .*over the limit of 0.005 megapixels") as refused:
            load_image(src, max_megapixels=0.005)
        assert refused.value.reason == "image_too_large" and Image.MAX_IMAGE_PIXELS == 1000
    with pytest.raises(BadSample, match="Could not decode"):
        load_image(b"not an image")
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_a_900_megapixel_bomb_is_refused_from_its_header():
    with pytest.raises(BadSample, match=r"30000x30000 \(900.0 megapixels\), over the limit of 200") as refused:
        load_image(_bomb_png())  # decoding it would allocate 900 MB
    assert refused.value.reason == "image_too_large"


@pytest.mark.parametrize("limit", [0, -5, float("nan"), float("inf"), None, "200"])
def test_a_limit_that_is_not_a_positive_number_fails_at_construction(limit):
    with pytest.raises(ValueError, match="data.max_image_megapixels must be a positive number"):
        ImagePreprocessor(280, max_megapixels=limit)


@pytest.mark.parametrize("budget", [1, 8, 70, 140, 280, 560, 1120, 3000])
def test_target_size_any_budget(budget):
    for height in (1, 7, 50, 333, 480, 1000, 4000):
        for width in (1, 9, 48, 640, 2000, 10000):
            try:
                ref = get_aspect_ratio_preserving_size(height, width, 16, budget * 9, 3)
            except ValueError:  # both sides floor to 0: we return one token instead
                ref = (48, 48)
            new_h, new_w = target_size(height, width, budget)
            assert (new_h, new_w) == ref
            assert new_h % 48 == 0 and new_w % 48 == 0 and (new_h // 48) * (new_w // 48) <= budget


def test_target_size_edge_cases():
    with pytest.raises(ValueError, match="max_soft_tokens"):
        target_size(100, 100, 0)
    with pytest.raises(ValueError):  # transformers raises here; a budget of 1 gives one token
        get_aspect_ratio_preserving_size(17, 17, 16, 9, 3)
    assert target_size(17, 17, 1) == (48, 48)


def test_patch_layout_without_resize():
    """A 48x96 image at budget 2 needs no resize: token t is the t-th 48x48 block, HWC row-major."""
    pixels = np.random.default_rng(4).integers(0, 256, (48, 96, 3), dtype=np.uint8)
    pixel_values, position_ids = patchify(pixels, max_soft_tokens=2)
    assert position_ids.tolist() == [[0, 0], [1, 0]]
    for token, (x, y) in enumerate(position_ids.tolist()):
        block = pixels[48 * y : 48 * (y + 1), 48 * x : 48 * (x + 1)].reshape(-1)
        assert torch.equal(pixel_values[token], torch.from_numpy(block))


def test_small_budget_positions():
    pixel_values, position_ids = patchify(_noise_and_gradient(300, 500), max_soft_tokens=8)
    grid_h, grid_w = (side // 48 for side in target_size(300, 500, 8))
    assert pixel_values.shape == (grid_h * grid_w, 6912) and grid_h * grid_w <= 8
    assert position_ids.tolist() == [[x, y] for y in range(grid_h) for x in range(grid_w)]


def test_preprocessor_from_bytes_and_path(tmp_path):
    image = Image.fromarray(_noise_and_gradient(120, 200))
    path = tmp_path / "image.png"
    image.save(path)
    preprocess = ImagePreprocessor(max_soft_tokens=70)
    from_path = preprocess(path)
    from_bytes = preprocess(path.read_bytes())
    expected = patchify(image, 70)
    for got in (from_path, from_bytes, preprocess(str(path))):
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def _jpeg(height: int, width: int, orientation: int = 1) -> bytes:
    """A smooth photo-like JPEG (gradients + ripples): resampling at any scale agrees closely on it."""
    ys, xs = np.mgrid[0:height, 0:width] / max(height, width)
    ripple = 40 * np.sin(25 * xs) * np.cos(17 * ys)
    pixels = np.stack([200 * xs + ripple, 200 * ys - ripple, 100 + 60 * np.sin(9 * (xs + ys))], -1) + 30
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90, exif=exif)
    return buffer.getvalue()


@pytest.mark.parametrize("height,width,orientation", [
    (1512, 2016, 1), (1512, 2016, 6), (3024, 4032, 1), (3000, 1000, 8), (4000, 200, 1), (1344, 1920, 1)
])
def test_jpeg_draft_keeps_grid_and_never_undershoots(height, width, orientation):
    """Draft decoding shrinks big JPEGs by 1/2..1/8 but never below the target, and keeps the token grid."""
    data = _jpeg(height, width, orientation)
    exact = ImagePreprocessor(280)(data)
    drafted = ImagePreprocessor(280, jpeg_draft=True)
    pixel_values, position_ids = drafted(data)
    assert pixel_values.shape == exact[0].shape and pixel_values.dtype == torch.uint8
    assert torch.equal(position_ids, exact[1])
    assert torch.equal(drafted(data)[0], pixel_values)  # deterministic

    image, (new_h, new_w) = load_image_draft(data, drafted.target_size)
    upright = (width, height) if orientation not in (5, 6, 7, 8) else (height, width)
    assert (new_h, new_w) == drafted.target_size(upright[1], upright[0])
    assert image.width >= new_w and image.height >= new_h
    if min(upright[0] // new_w, upright[1] // new_h) >= 2:
        assert image.width < upright[0]  # the draft did shrink
    assert (pixel_values.float() - exact[0].float()).abs().mean() < 1  # not exact, but close on smooth content


def test_jpeg_draft_is_exact_when_no_shrink_applies(tmp_path):
    """A JPEG under 2x the target, a PNG and a PIL image decode exactly as without the draft."""
    small_jpeg = _jpeg(480, 640)
    path = tmp_path / "image.png"
    Image.fromarray(_noise_and_gradient(900, 1200)).save(path)
    for src in (small_jpeg, path, Image.open(path)):
        exact, drafted = ImagePreprocessor(280)(src), ImagePreprocessor(280, jpeg_draft=True)(src)
        assert torch.equal(exact[0], drafted[0]) and torch.equal(exact[1], drafted[1])
