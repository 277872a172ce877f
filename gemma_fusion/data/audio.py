"""Audio preprocessing for encoder-free audio tokens (Gemma 4 "unified" recipe).

A clip is decoded, mixed to mono, resampled to 16 kHz and cut into raw-waveform frames of
`samples_per_token` samples (640 = 40 ms), one frame per soft token, the last zero-padded.
This is exactly what transformers' `Gemma4UnifiedAudioFeatureExtractor` does for one clip
(pad + reshape + float32; no normalisation, no mel), without its batch padding.
"""

import io
import os
from functools import lru_cache
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
import torchaudio
import torchaudio.functional as AF
from einops import rearrange

from gemma_fusion.core.errors import BadSample, UserError

AudioSource = bytes | bytearray | memoryview | str | os.PathLike | tuple[np.ndarray | torch.Tensor, int]


def load_audio(src: AudioSource, sampling_rate: int = 16000) -> torch.Tensor:
    """Decode `src` into a mono float32 waveform at `sampling_rate`.

    Args:
        src: encoded bytes or a path (anything libsndfile reads: WAV, FLAC, OGG/Vorbis, and
            MP3 with libsndfile >= 1.1), or a `(samples, sr)` tuple. Tuple samples are
            [T] or 2-D with channels on the shorter axis (so [T, C] and [C, T] both work);
            integer PCM is scaled to full scale +-1 (int16 / 2**15, int32 / 2**31, uint8 offset 128).

    Returns:
        float32 [T'], T' = ceil(T * sampling_rate / sr); full scale is +-1 (not clipped, so
        float files and resampling overshoot may slightly exceed it). Empty input gives [0].

    Raises:
        BadSample (a UserError, a ValueError), reason `audio_undecodable`: the bytes are not decodable audio. Errors reading a path
            (missing file, permissions) propagate unchanged.
    """
    if isinstance(src, tuple):
        samples, source_rate = src
        wave = _mono(_to_float(samples))
    else:
        if isinstance(src, (str, os.PathLike)):
            src = Path(src).read_bytes()
        try:
            samples, source_rate = sf.read(io.BytesIO(src), dtype="float32", always_2d=True)
        except (sf.SoundFileError, RuntimeError, TypeError, ValueError) as err:
            reason = str(getattr(err, "error_string", err)).rstrip(".")  # without the BytesIO repr
            raise BadSample("audio_undecodable", (
                f"Could not decode the audio data ({reason}); pass the bytes of a complete WAV, FLAC, "
                "OGG or MP3 file, or a (samples, sampling_rate) tuple.")) from err
        wave = torch.from_numpy(samples).mean(dim=1)  # T, C -> T
    if source_rate != sampling_rate and wave.numel() > 0:
        wave = resample(wave, int(source_rate), int(sampling_rate))
    return wave.contiguous()


def resample(wave: torch.Tensor, orig_freq: int, new_freq: int) -> torch.Tensor:
    """torchaudio's sinc resampling (its `Resample` transform), without oneDNN.

    oneDNN builds a convolution primitive for every new input length: clips of varying length paid ~3 ms each for
    that against ~0.3 ms for the arithmetic (a third of the demo loader's time in its first epoch). torch's own
    convolution gives the same output to float rounding (~3e-7).
    """
    enabled = torch.backends.mkldnn.enabled  # (mkldnn.flags() would also reset oneDNN's TF32 switch, warning)
    torch.backends.mkldnn.enabled = False
    try:
        return _resampler(orig_freq, new_freq)(wave)
    finally:
        torch.backends.mkldnn.enabled = enabled


@lru_cache(maxsize=32)
def _resampler(orig_freq: int, new_freq: int) -> torchaudio.transforms.Resample:
    """torchaudio's resampler with its filter kernel built once per rate pair (same output as AF.resample)."""
    return torchaudio.transforms.Resample(orig_freq, new_freq)


def _to_float(samples: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Samples of any dtype as float32 at full scale +-1 (same shape)."""
    if not isinstance(samples, torch.Tensor):
        samples = torch.as_tensor(np.asarray(samples))
    if samples.dtype == torch.uint8:
        return (samples.to(torch.float32) - 128) / 128
    if samples.dtype in (torch.int16, torch.int32, torch.int64):
        bits = {torch.int16: 15, torch.int32: 31, torch.int64: 63}[samples.dtype]
        return (samples.to(torch.float64) / 2**bits).to(torch.float32)
    return samples.to(torch.float32)


def _mono(wave: torch.Tensor) -> torch.Tensor:
    """[T] or 2-D (channels on the shorter axis, axis 0 on a tie) -> [T] by averaging channels."""
    if wave.ndim == 1:
        return wave
    if wave.ndim != 2:
        raise UserError(f"Audio samples must be [T] or 2-D [T, C] / [C, T], got shape {tuple(wave.shape)}.")
    return wave.mean(dim=0 if wave.shape[0] <= wave.shape[1] else 1)


def frame_audio(wave: torch.Tensor | np.ndarray, samples_per_token: int = 640) -> torch.Tensor:
    """Cut a mono waveform [T] into float32 frames [ceil(T / S), S], zero-padding the last.

    T == 0 gives an empty [0, S] tensor.
    """
    wave = torch.as_tensor(wave, dtype=torch.float32)
    wave = F.pad(wave, (0, (-wave.shape[0]) % samples_per_token))
    return rearrange(wave, "(n s) -> n s", s=samples_per_token)  # T -> N, S


@dataclass(frozen=True)
class AudioPreprocessor:
    """Callable `src -> frames [N, samples_per_token]`: load_audio, optional truncation, frame_audio.

    `max_seconds` keeps the first round(max_seconds * sampling_rate) samples (30 s -> 750
    tokens, the processor's default `audio_seq_length`); None keeps everything.
    """

    sampling_rate: int = 16000
    samples_per_token: int = 640
    max_seconds: float | None = None

    def __call__(self, src: AudioSource) -> torch.Tensor:
        wave = load_audio(src, self.sampling_rate)
        if self.max_seconds is not None:
            wave = wave[: round(self.max_seconds * self.sampling_rate)]
        return frame_audio(wave, self.samples_per_token)
