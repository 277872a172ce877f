"""A user's own speech data: raw-frame projector vs mel encoder by one override, compared by `eval.py compare=`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from gemma_fusion.eval import recipe as eval_recipe
from gemma_fusion.training import recipe
from gemma_fusion.data.write_shards import write_shards
from gemma_fusion.core.errors import UserError
from gemma_fusion.eval.compare import paired_bootstrap
from tests.training.conftest import compose_train

REPO = Path(__file__).resolve().parents[2]
# Recordings as users have them: different rates, stereo, 24-bit, float, FLAC.
FORMATS = [(8000, 1, "WAV", "PCM_16"), (44100, 2, "FLAC", "PCM_16"), (22050, 1, "WAV", "PCM_24"),
           (48000, 1, "WAV", "FLOAT")]


def write_speech_set(root: Path, n: int, seed: int) -> Path:
    """n clips of 0.3-0.8 s (two tones, target "low" or "high") -> manifest -> shards under root/shards."""
    rng = np.random.default_rng(seed)
    (root / "audio").mkdir(parents=True)
    rows = []
    for i in range(n):
        rate, channels, fmt, subtype = FORMATS[i % len(FORMATS)]
        word = "low" if i % 2 else "high"
        t = np.arange(int(rate * rng.uniform(0.3, 0.8))) / rate
        wave = 0.4 * np.sin(2 * np.pi * (300 if word == "low" else 1800) * t) + 0.01 * rng.standard_normal(t.size)
        name = f"audio/clip{i:03d}.{fmt.lower()}"
        sf.write(root / name, np.repeat(wave[:, None], channels, axis=1), rate, format=fmt, subtype=subtype)
        rows.append({"id": f"clip{i:03d}", "audio": name, "prompt": "Transcribe:", "target": word, "task": "pitch"})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = write_shards(root / "manifest.jsonl", root / "shards", samples_per_shard=8, workers=1)
    assert summary == {"written": n, "rejected": {}}
    return root / "shards"


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    """data/train and data/val of the user's speech set (the layout compose_train expects)."""
    root = tmp_path_factory.mktemp("speech")
    write_speech_set(root / "train_src", 16, seed=0).rename(root / "train")
    write_speech_set(root / "val_src", 8, seed=1).rename(root / "val")
    return root


def test_raw_frames_and_mel_encoder_switch_by_one_override_and_eval_compares_them(tiny_gemma4_dir, speech, tmp_path):
    runs = {}
    for design in ("audio_frames", "mel_conformer"):
        cfg = compose_train(tiny_gemma4_dir, speech, "data=shards", "model/vision=none", f"model/audio={design}",
                            "eval_after_train=false", "trainer.max_steps=2")
        runs[design] = tmp_path / design
        recipe.train(cfg, runs[design])
    designs = {d: json.loads((runs[d] / "compute.json").read_text())["designs"]["audio"] for d in runs}
    assert designs["audio_frames"] != designs["mel_conformer"] and designs["mel_conformer"].endswith("MelConformerProjector")

    out = subprocess.run([sys.executable, "eval.py", f"run={runs['audio_frames']}",
                          f"compare=[{runs['mel_conformer']}]", f"data.eval={speech / 'val'}"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    comparison = json.loads((runs["audio_frames"] / "eval_compare.json").read_text())
    first, second = comparison["runs"]
    assert (first["run"], second["run"]) == (str(runs["audio_frames"]), str(runs["mel_conformer"]))
    assert first["overall"]["n"] == second["overall"]["n"] == 8
    assert second["cost"]["trainable_params"] > first["cost"]["trainable_params"] > 0
    assert second["cost"]["projector_flops_per_sample"] > first["cost"]["projector_flops_per_sample"] > 0
    paired = comparison["paired"][0]
    assert paired["n"] == 8 and paired["against"] == str(runs["audio_frames"])
    assert paired["modalities"]["audio"]["n"] == 8  # speech only: the one modality is the whole set
    mean, lo, hi = paired["loss_diff"]
    assert lo <= mean <= hi
    assert mean == pytest.approx(second["overall"]["loss"] - first["overall"]["loss"], abs=0.5)  # per-sample vs per-token mean
    for run_dir in runs.values():  # each run's own evaluation on the same samples, as eval.py writes it alone
        assert json.loads((run_dir / "eval.json").read_text())["overall"]["n"] == 8
    assert "paired samples" in out.stdout and "mel_conformer" in out.stdout


def test_compare_without_common_data_is_one_sentence(tiny_gemma4_dir, tiny_demo_dir, speech, tmp_path):
    """Runs validated on different sets are not compared unless data.eval names one set for all of them."""
    for name, data in (("a", speech), ("b", tiny_demo_dir)):
        extra = ["data=shards", "model/vision=none"] if name == "a" else []
        recipe.train(compose_train(tiny_gemma4_dir, data, *extra, "eval_after_train=false",
                                        "trainer.max_steps=1"), tmp_path / name)
    from hydra import compose, initialize_config_dir

    from gemma_fusion.core.config import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=[f"run={tmp_path / 'a'}", f"compare=[{tmp_path / 'b'}]"])
    with pytest.raises(UserError, match="validated on different data.*data.eval=SHARDS"):
        eval_recipe.run(cfg)


def test_paired_bootstrap_interval_covers_a_known_difference_and_excludes_zero():
    rng = np.random.default_rng(0)
    diffs = list(0.3 + rng.standard_normal(400) * 0.5)
    mean, lo, hi = paired_bootstrap(diffs)
    assert lo < 0.3 < hi and lo > 0 and hi - lo < 0.2
    mean, lo, hi = paired_bootstrap(list(rng.standard_normal(400) * 0.5))
    assert lo < 0 < hi
