"""The audio designs: one soft token per frame, padding never reaches valid frames, gradients, bad settings."""
from __future__ import annotations

import copy

import pytest
import torch
import torchaudio
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

from gemma_fusion.models.projectors.audio_designs import (FrameStackProjector, HFAudioProjector,
                                                          MelConformerProjector, SincFilterbankProjector,
                                                          WaveConvProjector, mel_spaced, power_mel)

OUT, FRAME = 32, 320


def tiny_whisper(path, max_source_positions: int = 100, seed: int = 0) -> WhisperModel:
    """A random tiny Whisper (16 mel bins, 32 wide) saved to `path`; never downloaded. The special ids are set
    because Whisper's defaults (50256, 50257) do not fit a 100-token vocabulary."""
    torch.manual_seed(seed)
    model = WhisperModel(WhisperConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=max_source_positions,
        vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3))
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_whisper")
    tiny_whisper(path)
    return path


@pytest.fixture(params=["frame_stack_mlp", "conv1d", "mel_conformer", "sinc_fbank", "hf_audio", "hf_audio_trainable"])
def design(request, whisper_dir):
    torch.manual_seed(0)
    return {
        "frame_stack_mlp": lambda: FrameStackProjector(OUT, FRAME, stack=4, embed_dim=16, hidden_dim=24),
        "conv1d": lambda: WaveConvProjector(OUT, FRAME, channels=8),
        "mel_conformer": lambda: MelConformerProjector(OUT, FRAME, n_mels=16, width=16, depth=2, heads=2,
                                                       kernel_size=5),
        "sinc_fbank": lambda: SincFilterbankProjector(OUT, FRAME, bands=12, hidden_dim=24),
        "hf_audio": lambda: HFAudioProjector(OUT, str(whisper_dir), FRAME),
        "hf_audio_trainable": lambda: HFAudioProjector(OUT, str(whisper_dir), FRAME, trainable=True, hidden_dim=24),
    }[request.param]()


def clips(lengths=(7, 4), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames [N, T_max, FRAME] of random clips with the collator's zero padding, and the mask [N, T_max]."""
    gen = torch.Generator().manual_seed(seed)
    frames = torch.zeros(len(lengths), max(lengths), FRAME)
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.bool)
    for i, n in enumerate(lengths):
        frames[i, :n] = 0.3 * torch.randn(n, FRAME, generator=gen)
        mask[i, :n] = True
    return frames, mask


def call(proj, frames, mask):
    return proj.soft_tokens(frames, mask)  # the contract drops the mask for designs that take none


def test_one_soft_token_per_frame(design):
    frames, mask = clips()
    assert call(design, frames, mask).shape == (2, 7, OUT)
    assert design.frame_dim == FRAME and design.out_dim == OUT
    assert design(*design.idle_inputs("cpu")).shape == (1, 1, OUT)  # as FusionModel._run_idle calls it
    assert design.soft_tokens(*design.idle_inputs("cpu")).shape == (1, 1, OUT)


def test_padding_frames_do_not_change_valid_outputs(design):
    design.eval()
    frames, mask = clips()
    noisy = frames.clone()
    noisy[~mask] = torch.randn(int((~mask).sum()), FRAME)  # other padded samples
    with torch.no_grad():
        batched, with_noise = call(design, frames, mask), call(design, noisy, mask)
        alone = call(design, frames[1:, :4], mask[1:, :4])  # the short clip without its batch's padding
    torch.testing.assert_close(with_noise[mask], batched[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone[0], batched[1, :4], atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_trainable_parameter(design):
    design.train()
    frames, mask = clips()
    call(design, frames, mask)[mask].square().mean().backward()
    trainable = {n: p for n, p in design.named_parameters() if p.requires_grad}
    assert trainable
    no_grad = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad


@pytest.mark.parametrize("make", [
    lambda: FrameStackProjector(OUT, 320, stack=3),
    lambda: FrameStackProjector(OUT, 320, stack=0),
    lambda: WaveConvProjector(OUT, 16, kernels=(10, 3, 3), strides=(5, 2, 2)),
    lambda: WaveConvProjector(OUT, 320, kernels=(10, 3), strides=(5,)),
    lambda: MelConformerProjector(OUT, 322),
    lambda: SincFilterbankProjector(OUT, 640, min_hz=7990.0),
], ids=["stack_not_dividing", "stack_zero", "frame_too_short_for_convs", "kernels_strides_mismatch", "hop_not_integer",
        "cutoff_above_nyquist"])
def test_bad_frame_settings_raise(make):
    with pytest.raises(ValueError):
        make()


def test_hf_audio_rejects_frames_that_are_not_whole_encoder_steps(whisper_dir):
    with pytest.raises(ValueError, match="multiple of 320"):
        HFAudioProjector(OUT, str(whisper_dir), frame_dim=480)


def test_hf_audio_rejects_a_clip_longer_than_the_window(whisper_dir):
    proj = HFAudioProjector(OUT, str(whisper_dir), frame_dim=640)  # window: 100 outputs = 2 s = 50 tokens
    assert proj(torch.zeros(1, 50, 640)).shape == (1, 50, OUT)
    with pytest.raises(ValueError, match="longer than the Whisper encoder's window of 2 s"):
        proj(torch.zeros(1, 51, 640))


def test_hf_audio_loads_the_encoder_and_freezes_it_unless_trainable(whisper_dir):
    frozen = HFAudioProjector(OUT, str(whisper_dir), FRAME)
    reference = WhisperModel.from_pretrained(whisper_dir).encoder.state_dict()
    assert all(torch.equal(reference[k], v) for k, v in frozen.encoder.state_dict().items())
    assert not any(p.requires_grad for p in frozen.encoder.parameters())
    assert all(p.requires_grad for p in frozen.mlp.parameters())
    assert not frozen.train().encoder.training
    trainable = HFAudioProjector(OUT, str(whisper_dir), FRAME, trainable=True)
    assert trainable.train().encoder.training and trainable.encoder.conv1.weight.requires_grad


def test_hf_audio_log_mel_equals_whisper_feature_extractor(whisper_dir):
    proj = HFAudioProjector(OUT, str(whisper_dir), FRAME)
    wave = 0.3 * torch.randn(23_000)
    extractor = WhisperFeatureExtractor(feature_size=16, chunk_length=2)  # the tiny encoder's 2 s window
    expected = extractor(wave.numpy(), sampling_rate=16000, return_tensors="pt").input_features
    padded = torch.nn.functional.pad(wave, (0, proj.window_samples - wave.numel()))
    torch.testing.assert_close(proj.log_mel(padded[None]), expected, atol=1e-4, rtol=1e-4)


def test_hf_audio_rejects_a_path_without_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        HFAudioProjector(OUT, str(tmp_path / "nope"))


def test_mel_conformer_front_end_is_torchaudio_mel_spectrogram():
    proj = MelConformerProjector(OUT, FRAME, n_mels=16, width=16, depth=1, heads=2)
    wave = 0.3 * torch.randn(2, 4 * FRAME)
    expected = torchaudio.transforms.MelSpectrogram(sample_rate=16000, n_fft=400, hop_length=FRAME // 4, n_mels=16,
                                                    pad_mode="constant")(wave)
    torch.testing.assert_close(power_mel(wave, proj.window, proj.mel_fbank, proj.hop, "constant"), expected)


def fft_band_energy(proj: SincFilterbankProjector, frames: torch.Tensor) -> torch.Tensor:
    """Each band's mean power, from torch.fft.rfft of the Hann-windowed frames (not the projector's DFT matrix):
    sum_f response(f) |X(f)|^2 / N over sum_f response(f), in float64 --> [..., T, bands]."""
    n = frames.shape[-1]
    power = torch.fft.rfft(frames.double() * torch.hann_window(n, periodic=True, dtype=torch.float64)).abs().pow(2) / n
    response = proj.responses().double()
    return power @ response.T / response.sum(-1)


def test_sinc_fbank_band_energies_equal_an_fft_reference():
    """The DFT-by-matmul front end against the rfft reference; the features are the log, minus the clip's mean."""
    torch.manual_seed(0)
    proj = SincFilterbankProjector(OUT, 640, bands=16, hidden_dim=24)
    with torch.no_grad():
        proj.low_hz.add_(torch.rand(16) * 50)  # cut-offs off the initial grid
    frames, mask = 0.3 * torch.randn(1, 5, 640), torch.ones(1, 5, dtype=torch.bool)
    log_energy = torch.log(fft_band_energy(proj, frames) + proj.eps)
    expected = proj.mlp((log_energy - log_energy.mean(1, keepdim=True)).float())
    torch.testing.assert_close(proj(frames, mask), expected, atol=1e-5, rtol=1e-4)


def test_sinc_fbank_picks_the_band_of_a_tone_and_ignores_the_gain():
    """A pure tone lights the band whose cut-offs enclose it (mel-spaced at initialisation); scaling the waveform
    by 100 moves every log energy by the same constant, which the per-clip mean removes."""
    proj = SincFilterbankProjector(OUT, 640, bands=32, hidden_dim=24)
    edges = mel_spaced(30.0, 8000.0, 33)
    t = torch.arange(4 * 640) / 16000
    for hz in (697.0, 1336.0, 3000.0):
        tone = torch.sin(2 * torch.pi * hz * t).reshape(1, 4, 640)
        band = int(torch.searchsorted(edges, torch.tensor(hz))) - 1
        assert int(fft_band_energy(proj, tone[0, 1]).argmax()) == band
    clip, mask = 0.1 * torch.randn(1, 6, 640) + tone[:, :1].repeat(1, 6, 1), torch.ones(1, 6, dtype=torch.bool)
    torch.testing.assert_close(proj(100 * clip, mask), proj(clip, mask), atol=1e-4, rtol=1e-4)


def test_sinc_fbank_in_bfloat16_computes_its_front_end_in_float32():
    """A model cast to bfloat16 (exports, `backbone.dtype`) keeps the DFT and the band responses in float32: the
    output is the float32 module's up to bfloat16 rounding of the MLP."""
    torch.manual_seed(0)
    proj = SincFilterbankProjector(OUT, 640, bands=16, hidden_dim=24)
    frames, mask = 0.3 * torch.randn(2, 5, 640), torch.ones(2, 5, dtype=torch.bool)
    expected = proj(frames, mask)
    half = copy.deepcopy(proj).to(torch.bfloat16)
    out = half(frames.bfloat16(), mask)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)
