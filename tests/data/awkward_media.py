"""A corpus of media files in the awkward formats real datasets contain, good and broken, for the shard writer.

`make_awkward_corpus(root)` writes everything with Pillow, numpy and soundfile (nothing is downloaded;
about 1 s and 1 MB, most of it one 24-megapixel JPEG) plus `root/manifest.jsonl`, and returns the
manifest path and the summary the writer must end with. Every manifest row but the garbage line
carries an extra `expect` key, which the writer passes into the sample json unchanged:
`{"reason": tag}` for a row that must be rejected, or `{"reason": null, "image_sizes": [[w, h], ...],
"audio_seconds": [...]}` (upright sizes, true durations) for a row that must be kept.
A file `outside.png` is written next to `root` (not inside it) for the path rules.
"""
from __future__ import annotations

import io
import json
import struct
import warnings
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

GARBAGE_LINE = '{"id": "garbage", "prompt": oops this is not JSON'


def make_awkward_corpus(root: Path) -> tuple[Path, dict]:
    """Write the corpus into `root`; return (manifest path, expected {"written": N, "rejected": {...}})."""
    root = Path(root)
    for folder in ("images", "audio", "broken"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows: list[dict | str] = []

    def keep(row_id: str, image=(), audio=(), task: str | None = None, **fields) -> None:
        """A row that must be written; `image` / `audio` are (path, upright size) / (path, seconds) pairs."""
        row = {"id": row_id, "prompt": "Describe:" if image else "Transcribe:", "target": f"target of {row_id}"}
        row.update({"task": task} if task else {})
        if image:
            row["image"] = image[0][0] if len(image) == 1 else [path for path, _ in image]
        if audio:
            row["audio"] = audio[0][0] if len(audio) == 1 else [path for path, _ in audio]
        row["expect"] = {"reason": None, "image_sizes": [list(size) for _, size in image],
                         "audio_seconds": [seconds for _, seconds in audio]}
        rows.append({**row, **fields})

    def reject(row_id: str, reason: str, **fields) -> None:
        rows.append({"id": row_id, "prompt": "Describe:", "target": "anything", **fields, "expect": {"reason": reason}})

    # ---- good images: (path, upright (width, height))
    photo = _photo(rng, 320, 240)
    progressive = _save(root, "images/progressive.jpg", Image.fromarray(photo), quality=85, progressive=True)
    keep("progressive_jpeg", [progressive], task="caption")
    keep("cmyk_jpeg", [_save(root, "images/cmyk.jpeg", Image.fromarray(photo).convert("CMYK"))], task="caption")
    rotated = Image.fromarray(_photo(rng, 200, 100))  # stored 200 wide, 100 high
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display -> upright 100 x 200
    path, _ = _save(root, "images/exif_rot6.jpg", rotated, exif=exif.tobytes())
    keep("exif_rotated_jpeg", [(path, (100, 200))], task="caption")
    grey16 = Image.fromarray((np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 21))
    assert grey16.mode == "I;16"
    keep("grey16_png", [_save(root, "images/grey16.png", grey16)])
    palette = Image.fromarray(photo).quantize(16)
    keep("palette_transparent_png", [_save(root, "images/palette_trns.png", palette, transparency=0)])
    rgba = np.dstack([photo, np.linspace(0, 255, 320, dtype=np.uint8)[None, :].repeat(240, 0)])
    rgba_png = _save(root, "images/rgba.png", Image.fromarray(rgba, "RGBA"))
    keep("rgba_png", [rgba_png])
    keep("webp", [_save(root, "images/photo.webp", Image.fromarray(photo), quality=80)])
    keep("bmp_upper_case_ext", [_save(root, "images/Bitmap.BMP", Image.fromarray(photo[:60, :80]))])
    frames = [Image.fromarray(np.full((40, 60, 3), level, np.uint8)) for level in (0, 120, 250)]
    keep("animated_gif", [_save(root, "images/animated.gif", frames[0], save_all=True, append_images=frames[1:])])
    keep("multipage_tiff", [_save(root, "images/pages.TIF", frames[1], save_all=True, append_images=frames[2:])])
    pixel = _save(root, "images/pixel.png", Image.new("RGB", (1, 1), (255, 0, 0)))
    keep("one_pixel_png", [pixel])
    strip = _save(root, "images/strip.png", Image.fromarray(_photo(rng, 1000, 10)))
    keep("strip_100_to_1_png", [strip])
    big = Image.linear_gradient("L").resize((6000, 4000)).convert("RGB")  # 24 MP, low entropy: ~0.5 MB
    big_jpeg = _save(root, "images/big_24mp.jpg", big, quality=85)
    keep("jpeg_24_megapixel", [big_jpeg])
    keep("absolute_path_inside", [(str(root.resolve() / pixel[0]), pixel[1])])

    # ---- good audio: (path, seconds)
    pcm16 = _tone(root, "audio/tone_8k_pcm16.wav", 8000, 0.5, "WAV", "PCM_16")
    keep("wav_8k_pcm16", audio=[pcm16])
    keep("wav_22k_pcm24", audio=[_tone(root, "audio/tone_22k_pcm24.wav", 22050, 0.7, "WAV", "PCM_24")])
    keep("wav_48k_float", audio=[_tone(root, "audio/tone_48k_float.wav", 48000, 0.3, "WAV", "FLOAT")])
    keep("flac_stereo", audio=[_tone(root, "audio/stereo.flac", 44100, 0.6, "FLAC", "PCM_16", channels=2)])
    vorbis = _tone(root, "audio/voice.ogg", 16000, 0.8, "OGG", "VORBIS")
    keep("ogg_vorbis", audio=[vorbis])
    if "MP3" in sf.available_formats():
        keep("mp3", audio=[_tone(root, "audio/tone.mp3", 44100, 1.0, "MP3", "MPEG_LAYER_III")])
    else:
        warnings.warn("libsndfile < 1.1 cannot write MP3: the awkward corpus has no MP3 row")
    keep("silence_1s", audio=[_tone(root, "audio/silence.wav", 16000, 1.0, "WAV", "PCM_16", amplitude=0.0)])
    blip = _tone(root, "audio/blip_20ms.wav", 16000, 0.02, "WAV", "PCM_16")
    keep("clip_20ms", audio=[blip])

    # ---- mixed and text-only rows (extra keys travel into the sample json)
    keep("image_and_audio", [rgba_png], [pcm16], task="describe_sound", source="awkward", tags=["x", 1])
    keep("two_images", [progressive, strip], task="compare")
    keep("two_clips", audio=[vorbis, blip])
    keep("text_only", task="chat")

    # ---- broken rows
    jpeg = (root / progressive[0]).read_bytes()
    for name, data in [("truncated_half.jpg", jpeg[: len(jpeg) // 2]),  # Pillow refuses: "image file is truncated"
                       ("truncated_20_bytes.jpg", jpeg[:20]), ("empty.png", b""), ("random.png", rng.bytes(3000)),
                       ("text_renamed.jpg", b"Dear diary, this is not a JPEG.\n" * 20), ("bomb.png", _bomb_png())]:
        (root / "broken" / name).write_bytes(data)
        reason = "image_too_large" if name == "bomb.png" else "image_undecodable"
        reject(f"broken_{name}", reason, image=f"broken/{name}")
    sf.write(root / "broken" / "zero_samples.wav", np.zeros(0, np.float32), 16000, subtype="PCM_16")
    reject("zero_sample_wav", "audio_empty", audio="broken/zero_samples.wav")
    (root / "broken" / "random.wav").write_bytes(rng.bytes(3000))
    reject("random_bytes_wav", "audio_undecodable", audio="broken/random.wav")
    (root / "broken" / "notes.txt").write_text("not media\n")
    reject("text_extension", "unsupported_extension", image="broken/notes.txt")
    reject("audio_in_image_field", "unsupported_extension", image=pcm16[0])
    reject("missing", "missing_file", image="images/does_not_exist.png")
    outside = root.parent / "outside.png"
    Image.new("RGB", (8, 8), (0, 0, 255)).save(outside)
    reject("dot_dot_path", "outside_root", image="../outside.png")
    reject("absolute_outside", "outside_root", image=str(outside.resolve()))
    link = root / "images" / "link_to_outside.png"
    link.unlink(missing_ok=True)
    link.symlink_to(outside.resolve())
    reject("symlink_outside", "outside_root", image="images/link_to_outside.png")
    reject("blank_target", "empty_target", image=pixel[0], target="  \n")
    rows.append({"id": "no_target", "prompt": "Describe:", "image": pixel[0], "expect": {"reason": "empty_target"}})
    reject("progressive_jpeg", "duplicate_id", image=pixel[0])
    reject("image_not_a_path", "bad_row", image=5)
    rows.append({"id": "no_prompt", "target": "x", "expect": {"reason": "bad_row"}})
    rows.insert(len(rows) // 2, GARBAGE_LINE)

    manifest = root / "manifest.jsonl"
    manifest.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    reasons = Counter("bad_row" if isinstance(row, str) else row["expect"]["reason"] for row in rows)
    written = reasons.pop(None)
    return manifest, {"written": written, "rejected": dict(reasons)}


def _photo(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """uint8 [height, width, 3]: colour gradients plus noise, like a small photo."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], axis=-1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def _save(root: Path, name: str, image: Image.Image, **options) -> tuple[str, tuple[int, int]]:
    image.save(root / name, **options)
    return name, image.size


def _tone(root: Path, name: str, rate: int, seconds: float, fmt: str, subtype: str, channels: int = 1,
          amplitude: float = 0.3) -> tuple[str, float]:
    """A 440 Hz tone (or silence) of round(rate * seconds) frames; returns (name, true duration)."""
    frames = round(rate * seconds)
    wave = amplitude * np.sin(2 * np.pi * 440 * np.arange(frames) / rate)
    sf.write(root / name, np.repeat(wave[:, None], channels, axis=1), rate, format=fmt, subtype=subtype)
    return name, frames / rate


def _bomb_png(side: int = 30000) -> bytes:
    """A valid 1-bit PNG of side x side pixels (900 megapixels) that compresses to about 100 kB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (side + 7) // 8)  # filter byte + packed pixels, all black
    deflate = zlib.compressobj(9)
    pixels = b"".join(deflate.compress(row) for _ in range(side)) + deflate.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
