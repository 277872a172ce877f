"""Every config in configs/model/audio trains end to end on the tiny backbone and saves its audio parameters."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from gemma_fusion.training import recipe
from gemma_fusion.core.config import CONFIG_DIR
from gemma_fusion.models.build import build_model
from tests.models.test_audio_designs import tiny_whisper

AUDIO_DESIGNS = sorted(p.stem for p in (Path(CONFIG_DIR) / "model" / "audio").glob("*.yaml"))


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory):
    """A tiny random Whisper whose 3 s window covers the demo's DTMF clips (at most ~2 s)."""
    path = tmp_path_factory.mktemp("tiny_whisper")
    tiny_whisper(path, max_source_positions=150)
    return path


def test_every_audio_config_is_listed():
    assert {"none", "audio_frames", "frame_stack_mlp", "conv1d", "mel_conformer", "hf_audio"} <= set(AUDIO_DESIGNS)


@pytest.mark.parametrize("name", AUDIO_DESIGNS)
def test_audio_design_trains_and_saves_its_parameters(name, make_cfg, whisper_dir, tmp_path):
    if name == "none":  # images only: the DTMF samples are skipped (no_audio)
        model = recipe.train(make_cfg("model/audio=none", "trainer.max_steps=2"), tmp_path)
        saved = load_file(tmp_path / "final" / "trainable.safetensors")
        assert model.audio is None and saved and not any(k.startswith("audio.") for k in saved)
        return
    extra = [f"model.audio.path={whisper_dir}"] if name == "hf_audio" else []
    # model/vision=none skips the image samples: every batch is audio, so both steps run the audio design
    cfg = make_cfg(f"model/audio={name}", "model/vision=none", "trainer.max_steps=2", *extra)
    L.seed_everything(cfg.seed)  # as train() does before it builds: the same initial weights
    initial = {n: p.detach().clone() for n, p in build_model(cfg).named_parameters()}
    model = recipe.train(cfg, tmp_path)

    saved = load_file(tmp_path / "final" / "trainable.safetensors")
    audio = {k for k in saved if k.startswith("audio.")}
    assert audio and audio == {n for n, p in model.named_parameters() if n.startswith("audio.") and p.requires_grad}
    # hf_audio's Whisper encoder (trainable: false) stays frozen: not trained, not saved, not in the optimizer
    assert not any(k.startswith("audio.encoder.") for k in audio)
    tower = {n: p for n, p in model.named_parameters() if n.startswith("audio.encoder.")}
    assert all(not p.requires_grad and torch.equal(p, initial[n]) for n, p in tower.items())
    assert (name == "hf_audio") == bool(tower)
    moved = [k for k in audio if not torch.equal(saved[k], initial[k])]
    assert sorted(moved) == sorted(audio)
