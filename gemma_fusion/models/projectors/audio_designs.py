"""Audio designs for the ablation lab: raw 16 kHz frames of `frame_dim` samples -> one soft token per frame.

`frame_stack_mlp` and `conv1d` see one frame at a time (encoder-free, like `audio_frames`); `mel_conformer`
(log-mel + a small encoder from scratch) and `hf_audio` (a pretrained Whisper encoder) see whole clips and
take the frame mask (`uses_mask = True`). Tokens per second = 16000 / frame_dim for every design. Geometry,
mask dispatch, idle inputs and frozen parts: the `AudioProjector` contract (base.py).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import torchaudio
from einops import rearrange
from torch import nn
from transformers import AutoConfig, WhisperFeatureExtractor, WhisperModel

from gemma_fusion.core.batch import SAMPLE_RATE
from gemma_fusion.core.errors import UserError
from gemma_fusion.models.projectors.base import AudioProjector
from gemma_fusion.models.projectors.norms import MultimodalEmbedder


def power_mel(wave: torch.Tensor, window: torch.Tensor, fbank: torch.Tensor, hop: int, pad_mode: str) -> torch.Tensor:
    """Centred Hann STFT -> |X|^2 -> mel filters, in float32 whatever the module's dtype or autocast.

    Signature :: wave [B, L], window [n_fft], fbank [n_fft // 2 + 1, n_mels] --> [B, n_mels, L // hop + 1]
    """
    with torch.autocast(wave.device.type, enabled=False):
        spec = torch.stft(wave.float(), window.numel(), hop, window=window.float(), center=True,
                          pad_mode=pad_mode, return_complex=True)  # B, n_fft // 2 + 1, L // hop + 1
        return torch.einsum("bft,fm->bmt", spec.abs().pow(2), fbank.float())


class FrameStackProjector(AudioProjector):
    """`frame_stack_mlp`: sub-frame embeddings stacked k at a time, then a SwiGLU MLP (Ultravox's stacking).

    Signature :: frames [B, T, frame_dim] --> [B, T, out_dim]

    Each frame is cut into `stack` sub-frames; each goes through scale-free RMSNorm -> Linear(frame_dim /
    stack -> embed_dim) (Gemma 4's embedder, shared), the `stack` embeddings are concatenated and projected
    by Linear(stack * embed_dim -> 2 * hidden_dim) -> SiLU(gate) * up -> Linear(hidden_dim -> out_dim).

    Args:
        out_dim: the backbone's hidden size.
        frame_dim: samples per soft token (640 = 40 ms).
        stack: sub-frames per frame; must divide frame_dim.
        embed_dim: width of each sub-frame embedding.
        hidden_dim: width of the SwiGLU.
        eps: epsilon of the scale-free RMSNorm.
    """

    def __init__(self, out_dim: int, frame_dim: int = 640, stack: int = 4, embed_dim: int = 256,
                 hidden_dim: int = 1024, eps: float = 1e-6):
        super().__init__(out_dim, frame_dim)
        if stack < 1 or frame_dim % stack:
            raise ValueError(f"frame_stack_mlp: frame_dim={frame_dim} is not divisible by stack={stack}; pick a "
                             "stack that divides it (e.g. 4 for 640-sample frames).")
        self.stack = stack
        self.embed = MultimodalEmbedder(frame_dim // stack, embed_dim, eps)
        self.gate_up = nn.Linear(stack * embed_dim, 2 * hidden_dim)
        self.down = nn.Linear(hidden_dim, out_dim)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = rearrange(frames, "b t (k s) -> b t k s", k=self.stack)  # B, T, F -> B, T, k, F/k
        x = rearrange(self.embed(x), "b t k d -> b t (k d)")  # B, T, k, D -> B, T, k*D
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class WaveConvProjector(AudioProjector):
    """`conv1d`: strided 1-D convolutions over each frame's samples, mean-pooled (wav2vec2's feature encoder).

    Signature :: frames [B, T, frame_dim] --> [B, T, out_dim]

    Conv1d(1, C, k0, s0) -> GroupNorm(C, C) -> GELU, then Conv1d(C, C, k, s) -> GELU for each further layer
    (wav2vec2's "default" mode, no conv bias), mean over the steps left in the frame, Linear(C -> out_dim).
    Frames are independent: nothing crosses a frame boundary.

    Args:
        out_dim: the backbone's hidden size.
        frame_dim: samples per soft token (640 = 40 ms).
        channels: C.
        kernels, strides: one entry per layer; every layer must still have an output on a frame.
    """

    def __init__(self, out_dim: int, frame_dim: int = 640, channels: int = 64,
                 kernels: Sequence[int] = (10, 3, 3, 3), strides: Sequence[int] = (5, 2, 2, 2)):
        super().__init__(out_dim, frame_dim)
        if not kernels or len(kernels) != len(strides):
            raise ValueError(f"conv1d: kernels {list(kernels)} and strides {list(strides)} need one entry per layer.")
        layers, steps = [], frame_dim
        for i, (kernel, stride) in enumerate(zip(kernels, strides)):
            steps = (steps - kernel) // stride + 1
            if steps < 1:
                raise ValueError(f"conv1d: a frame of {frame_dim} samples is too short for kernels {list(kernels)} "
                                 f"and strides {list(strides)} (layer {i} has no output); use fewer or smaller layers.")
            layers.append(nn.Conv1d(1 if i == 0 else channels, channels, kernel, stride, bias=False))
            if i == 0:
                layers.append(nn.GroupNorm(channels, channels))
            layers.append(nn.GELU())
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Linear(channels, out_dim)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = rearrange(frames.to(self.proj.weight.dtype), "b t f -> (b t) 1 f")
        x = self.convs(x).mean(-1)  # (B T), C, steps -> (B T), C
        return rearrange(self.proj(x), "(b t) d -> b t d", b=frames.shape[0])


def mel_spaced(low_hz: float, high_hz: float, count: int) -> torch.Tensor:
    """`count` frequencies in Hz evenly spaced on the HTK mel scale from `low_hz` to `high_hz` (both included)."""
    mel = torch.linspace(2595 * math.log10(1 + low_hz / 700), 2595 * math.log10(1 + high_hz / 700), count)
    return 700 * (10 ** (mel / 2595) - 1)


class SincFilterbankProjector(AudioProjector):
    """`sinc_fbank`: band-pass filters with learnable cut-offs on each frame -> log band energies -> MLP (SincNet-style).

    Signature :: frames [B, T, frame_dim], mask [B, T] --> [B, T, out_dim]

    Encoder-free in the sense of issue step 10: no pretrained encoder and no fixed mel transform; what it learns
    of the front end is, as in SincNet (Ravanelli & Bengio 2018), only each band's two cut-offs. Each frame is
    Hann-windowed and taken to its power spectrum |X(f)|^2 by a real DFT written as one matrix product (so
    FlopCounterMode, and with it RUN/compute.json, counts it); band k passes [f1_k, f2_k] with one-bin soft edges,
    f1_k = min_hz + |low_k|, f2_k = f1_k + min_band_hz + |band_k| (cut-offs initialised mel-spaced from min_hz
    to the Nyquist frequency), and its energy is the mean power inside the band: the frame's energy after an
    ideal zero-phase band-pass filter, per Hz. log(energy + eps) is then normalised per clip (each band's mean
    over the clip's real frames subtracted: gain-invariant, like cepstral mean normalisation) and an MLP,
    Linear(bands -> hidden_dim) -> GELU -> Linear(hidden_dim -> out_dim), makes one token per frame. Frames do
    not see each other except through that per-clip mean; padding frames are left out of it.

    Args:
        out_dim: the backbone's hidden size.
        frame_dim: samples per soft token (640 = 40 ms at 16 kHz; 25 Hz per DFT bin).
        bands: number of band-pass filters.
        hidden_dim: width of the MLP.
        min_hz: lowest cut-off at initialisation (and always: f1 >= min_hz).
        min_band_hz: narrowest band.
        eps: added to the band energies before the log.
    """

    uses_mask = True

    def __init__(self, out_dim: int, frame_dim: int = 640, bands: int = 64, hidden_dim: int = 256,
                 min_hz: float = 30.0, min_band_hz: float = 25.0, eps: float = 1e-6):
        super().__init__(out_dim, frame_dim)
        nyquist, bins = SAMPLE_RATE / 2, frame_dim // 2 + 1
        if not 0 <= min_hz < nyquist - min_band_hz:
            raise ValueError(f"sinc_fbank: min_hz={min_hz} must lie in [0, {nyquist - min_band_hz}) Hz (the Nyquist "
                             f"frequency {nyquist:g} Hz minus min_band_hz).")
        n, k = torch.arange(frame_dim, dtype=torch.float64), torch.arange(bins, dtype=torch.float64)
        phase = 2 * math.pi * torch.outer(n, k) / frame_dim  # frame_dim, bins
        window = torch.hann_window(frame_dim, periodic=True, dtype=torch.float64)[:, None]
        dft = torch.cat([window * torch.cos(phase), window * torch.sin(phase)], dim=1)  # frame_dim, 2 * bins
        self.register_buffer("dft", dft.float(), persistent=False)
        self.register_buffer("freqs", k.float() * SAMPLE_RATE / frame_dim, persistent=False)  # bins, Hz
        edges = mel_spaced(min_hz, nyquist, bands + 1)
        self.min_hz, self.min_band_hz, self.edge_hz, self.eps = min_hz, min_band_hz, SAMPLE_RATE / frame_dim, eps
        self.low_hz = nn.Parameter(edges[:-1] - min_hz)  # SincNet's parametrisation: cut-offs in Hz
        self.band_hz = nn.Parameter((edges[1:] - edges[:-1] - min_band_hz).clamp(min=0.0))
        self.mlp = nn.Sequential(nn.Linear(bands, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))

    def responses(self) -> torch.Tensor:
        """[bands, bins] each filter's power response, 0..1, on the DFT bins, in float32 whatever the module's dtype."""
        low = self.min_hz + self.low_hz.float().abs()
        high = (low + self.min_band_hz + self.band_hz.float().abs()).clamp(max=SAMPLE_RATE / 2)
        f = self.freqs.float()[None, :]
        return torch.sigmoid((f - low[:, None]) / self.edge_hz) * torch.sigmoid((high[:, None] - f) / self.edge_hz)

    def forward(self, frames: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        valid = torch.ones(frames.shape[:2], dtype=torch.bool, device=frames.device) if mask is None else mask.bool()
        with torch.autocast(frames.device.type, enabled=False):
            spectrum = frames.float() @ self.dft.float()  # B, T, 2 * bins: the windowed frame's real, imaginary parts
            power = spectrum.pow(2).unflatten(-1, (2, -1)).sum(-2) / self.frame_dim  # B, T, bins
            response = self.responses()
            energy = power @ response.T / response.sum(-1)  # B, T, bands: mean power inside each band
            feats = torch.log(energy + self.eps)
            weight = valid[..., None].float()
            mean = (feats * weight).sum(1, keepdim=True) / weight.sum(1, keepdim=True).clamp(min=1.0)
            feats = (feats - mean) * weight  # padding frames -> 0
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


class ConvModule(nn.Module):
    """The Conformer convolution module with LayerNorm in place of BatchNorm (no batch statistics over padding).

    Signature :: x [B, T, D], pad [B, T] (True = padding) --> [B, T, D]

    x + (LayerNorm -> pointwise Linear(D -> 2D) -> GLU -> depthwise Conv1d(kernel_size) -> LayerNorm -> SiLU
    -> pointwise Linear(D -> D)); padding steps are zeroed before the depthwise conv, as beyond a clip's end.
    """

    def __init__(self, dim: int, kernel_size: int = 15):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.pointwise_in = nn.Linear(dim, 2 * dim)
        self.depthwise = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.depthwise_norm = nn.LayerNorm(dim)
        self.pointwise_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        y = F.glu(self.pointwise_in(self.norm(x)), dim=-1).masked_fill(pad[..., None], 0.0)
        y = rearrange(self.depthwise(rearrange(y, "b t d -> b d t")), "b d t -> b t d")
        return x + self.pointwise_out(F.silu(self.depthwise_norm(y)))


class MelConformerProjector(AudioProjector):
    """`mel_conformer`: log-mel -> conv subsampling x4 -> `depth` Conformer-style blocks -> Linear, from scratch.

    Signature :: frames [B, T, frame_dim], mask [B, T] --> [B, T, out_dim]

    Log-mel: torchaudio's MelSpectrogram (n_fft 400, HTK scale, power 2, hop frame_dim / 4, zero-padded
    centring) as log(x + 1e-6), computed in float32; the 4T + 1 hops are trimmed to 4T. Two Conv2d(3, stride
    2) -> GELU bring them to one vector per frame. Each block is the Conformer convolution module followed by a
    pre-norm nn.TransformerEncoderLayer (self-attention + GELU FFN, key padding mask): a Conformer block
    without the macaron half-FFNs or relative positions (the convolutions carry the order). Padding frames
    are zeroed before the mel and masked in attention, so a clip's outputs do not depend on its batch.

    Args:
        out_dim: the backbone's hidden size.
        frame_dim: samples per soft token; a multiple of 4 (4 mel hops per token).
        n_mels: mel bins.
        width: channels of the subsampling convs and width of the blocks.
        depth: number of blocks.
        heads: attention heads.
        kernel_size: depthwise conv kernel in tokens.
        dropout: dropout of the attention layers.
    """

    uses_mask = True

    def __init__(self, out_dim: int, frame_dim: int = 640, n_mels: int = 64, width: int = 128, depth: int = 2,
                 heads: int = 4, kernel_size: int = 15, dropout: float = 0.1):
        super().__init__(out_dim, frame_dim)
        if frame_dim % 4:
            raise ValueError(f"mel_conformer: frame_dim={frame_dim} must be a multiple of 4 (4 mel hops per token).")
        self.hop = frame_dim // 4
        self.register_buffer("window", torch.hann_window(400), persistent=False)
        self.register_buffer("mel_fbank", torchaudio.functional.melscale_fbanks(
            201, 0.0, SAMPLE_RATE / 2, n_mels, SAMPLE_RATE), persistent=False)
        self.subsample = nn.Sequential(nn.Conv2d(1, width, 3, 2, 1), nn.GELU(),
                                       nn.Conv2d(width, width, 3, 2, 1), nn.GELU())
        self.subsample_proj = nn.Linear(width * -(-n_mels // 4), width)
        self.convs = nn.ModuleList(ConvModule(width, kernel_size) for _ in range(depth))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, 4 * width, dropout, activation="gelu", batch_first=True,
                                       norm_first=True) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, out_dim)

    def forward(self, frames: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = frames.shape
        valid = torch.ones(b, t, dtype=torch.bool, device=frames.device) if mask is None else mask.bool()
        wave = rearrange(frames * valid[..., None], "b t f -> b (t f)")  # padding frames -> silence
        mel = power_mel(wave, self.window, self.mel_fbank, self.hop, "constant")[..., : 4 * t]  # B, M, 4T
        x = rearrange(torch.log(mel + 1e-6), "b m s -> b 1 s m").to(self.proj.weight.dtype)
        x = rearrange(self.subsample(x), "b c t m -> b t (c m)")  # B, 1, 4T, M -> B, T, C*M/4
        x, pad = self.subsample_proj(x), ~valid
        for conv, layer in zip(self.convs, self.layers):
            x = layer(conv(x, pad), src_key_padding_mask=pad)
        return self.proj(self.norm(x))


class HFAudioProjector(AudioProjector):
    """`hf_audio`: a pretrained Whisper encoder from a local directory, stacked to one vector per frame, then an MLP.

    Signature :: frames [B, T, frame_dim], mask [B, T] --> [B, T, out_dim]

    Log-mel features are computed in torch as WhisperFeatureExtractor computes them (its mel filters, Hann
    STFT with reflect centring, last hop dropped, log10, floor at max - 8, (x + 4) / 4) on the clip zero-padded
    to the encoder's fixed window (max_source_positions * 2 hops: 30 s for Whisper); padding frames are zeroed
    first, so they read as Whisper's own silence padding. Encoder output j covers samples [320 j, 320 (j + 1));
    frame_dim / 320 consecutive outputs are concatenated per token -> Linear -> GELU -> Linear(out_dim).

    Args:
        out_dim: the backbone's hidden size.
        path: local directory of a Whisper checkpoint (WhisperModel or WhisperForConditionalGeneration, with
            an optional preprocessor_config.json); nothing is downloaded.
        frame_dim: samples per soft token, a multiple of 320 (640: two encoder outputs per token).
        trainable: false: the encoder is frozen (in `frozen_modules()`, run without gradients, in eval mode);
            only the MLP trains.
        hidden_dim: width of the MLP; None: out_dim.
    """

    uses_mask = True

    def __init__(self, out_dim: int, path: str, frame_dim: int = 640, trainable: bool = False,
                 hidden_dim: int | None = None):
        super().__init__(out_dim, frame_dim)
        root = Path(path).expanduser()
        if not root.is_dir():
            raise UserError(f"hf_audio: model.audio.path={path} is not a directory; pass a local Whisper checkpoint.")
        config = AutoConfig.from_pretrained(root, local_files_only=True)
        if config.model_type != "whisper":
            raise UserError(f"hf_audio: {path} holds a {config.model_type!r} model; only Whisper encoders are "
                            "supported.")
        if (root / "preprocessor_config.json").is_file():
            extractor = WhisperFeatureExtractor.from_pretrained(root, local_files_only=True)
        else:
            extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
        if extractor.feature_size != config.num_mel_bins or extractor.sampling_rate != SAMPLE_RATE:
            raise UserError(f"hf_audio: {path}'s feature extractor gives {extractor.feature_size} mel bins at "
                            f"{extractor.sampling_rate} Hz; the encoder wants {config.num_mel_bins} at {SAMPLE_RATE}.")
        whisper, info = WhisperModel.from_pretrained(root, local_files_only=True, output_loading_info=True)
        missing = [k for k in info["missing_keys"] if k.startswith("encoder.")]
        if missing:
            raise UserError(f"hf_audio: {path} lacks encoder weights ({missing[:3]} ...).")
        self.encoder = whisper.encoder
        per_output = extractor.hop_length * self.encoder.conv1.stride[0] * self.encoder.conv2.stride[0]
        if frame_dim % per_output:
            raise ValueError(f"hf_audio: frame_dim={frame_dim} must be a multiple of {per_output} samples (one "
                             f"Whisper encoder output per {1000 * per_output // SAMPLE_RATE} ms).")
        self.trainable = trainable
        self.stack, self.hop = frame_dim // per_output, extractor.hop_length
        self.window_samples = config.max_source_positions * per_output
        self.register_buffer("window", torch.hann_window(extractor.n_fft), persistent=False)
        self.register_buffer("mel_fbank", torch.from_numpy(extractor.mel_filters).float(), persistent=False)
        hidden_dim = hidden_dim or out_dim
        self.mlp = nn.Sequential(nn.Linear(self.stack * config.d_model, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, out_dim))
        if not trainable:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    def frozen_modules(self) -> list[nn.Module]:
        return [] if self.trainable else [self.encoder]

    def log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        """Whisper's normalised log-mel.

        Signature :: wave [B, window_samples] --> [B, n_mels, 2 * max_source_positions]
        """
        mel = power_mel(wave, self.window, self.mel_fbank, self.hop, "reflect")[..., :-1]
        log = mel.clamp(min=1e-10).log10()
        log = torch.maximum(log, log.amax(dim=(1, 2), keepdim=True) - 8.0)
        return (log + 4.0) / 4.0

    def forward(self, frames: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        t = frames.shape[1]
        if t * self.frame_dim > self.window_samples:
            raise ValueError(f"hf_audio: a clip of {t * self.frame_dim / SAMPLE_RATE:g} s is longer than the Whisper "
                             f"encoder's window of {self.window_samples / SAMPLE_RATE:g} s "
                             f"({self.window_samples // self.frame_dim} tokens); set data.audio_max_seconds to at "
                             "most that.")
        if mask is not None:
            frames = frames * mask[..., None].to(frames.dtype)  # padding frames -> silence
        wave = F.pad(rearrange(frames, "b t f -> b (t f)"), (0, self.window_samples - t * self.frame_dim))
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            mel = self.log_mel(wave).to(self.encoder.conv1.weight.dtype)
            hidden = self.encoder(mel).last_hidden_state  # B, max_source_positions, d_model
        x = rearrange(hidden[:, : t * self.stack], "b (t k) d -> b t (k d)", k=self.stack)
        return self.mlp(x.to(self.mlp[0].weight.dtype))
