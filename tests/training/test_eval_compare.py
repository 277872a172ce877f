"""A user's own speech data: raw-frame projector vs mel encoder by one override, compared by `eval.py compare=`."""
from __future__ import annotations

import json
import math
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
    # the per-sample differences, paired by key from each run's own predictions file, and their exact bootstrap
    records = [{r["key"]: r for r in map(json.loads, (runs[d] / "eval_predictions.jsonl").read_text().splitlines())}
               for d in ("audio_frames", "mel_conformer")]
    assert records[0].keys() == records[1].keys() and len(records[0]) == 8
    for field, name in (("loss", "loss_diff"), ("exact_match", "exact_match_diff")):
        diffs = [records[1][k][field] - records[0][k][field] for k in sorted(records[0])]
        mean, lo, hi = paired[name]
        assert mean == pytest.approx(float(np.mean(diffs)), abs=1e-9)
        assert_interval_is_the_bootstrap_percentile_interval(diffs, lo, hi, samples=2000)
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


def exact_bootstrap_quantiles(diffs: list[float], levels: tuple[float, ...]) -> list[float]:
    """Quantiles of the exact bootstrap distribution of the mean of `diffs` (small n): every way to draw n of the n
    values with replacement, as counts c (summing to n) with multinomial probability n! / prod(c_i!) / n^n."""
    n, outcomes = len(diffs), []

    def counts(left: int, slots: int):
        if slots == 1:
            yield (left,)
            return
        for first in range(left + 1):
            for rest in counts(left - first, slots - 1):
                yield (first, *rest)

    for c in counts(n, n):
        weight = math.factorial(n) / math.prod(math.factorial(k) for k in c) / n**n
        outcomes.append((sum(k * d for k, d in zip(c, diffs)) / n, weight))
    outcomes.sort()
    values, cumulative = [v for v, _ in outcomes], np.cumsum([w for _, w in outcomes])
    assert cumulative[-1] == pytest.approx(1.0)
    return [values[int(np.searchsorted(cumulative, level))] for level in levels]


def assert_interval_is_the_bootstrap_percentile_interval(diffs: list[float], lo: float, hi: float, samples: int):
    """The 2.5 % / 97.5 % percentiles of `samples` bootstrap means fall where the exact distribution puts them:
    the k-th smallest of B draws sits at level k / (B + 1) give or take sqrt(p (1 - p) / B); 5 of those either way."""
    slack = 5 * math.sqrt(0.025 * 0.975 / samples)
    lo_band = exact_bootstrap_quantiles(diffs, (0.025 - slack, 0.025 + slack))
    hi_band = exact_bootstrap_quantiles(diffs, (0.975 - slack, 0.975 + slack))
    assert lo_band[0] - 1e-9 <= lo <= lo_band[1] + 1e-9, (lo, lo_band)
    assert hi_band[0] - 1e-9 <= hi <= hi_band[1] + 1e-9, (hi, hi_band)


def test_paired_bootstrap_is_the_percentile_interval_of_the_exact_bootstrap_distribution():
    diffs = [-1.3, -0.4, 0.1, 0.2, 0.5, 0.9, 1.7, 2.6]  # 8 values: 6,435 distinct resamples, enumerated
    mean, lo, hi = paired_bootstrap(diffs)
    assert mean == pytest.approx(sum(diffs) / 8)
    assert_interval_is_the_bootstrap_percentile_interval(diffs, lo, hi, samples=2000)
    assert paired_bootstrap([0.25] * 5) == [0.25, 0.25, 0.25]  # no spread, no interval


def test_paired_bootstrap_of_a_proportion_matches_the_binomial_quantiles():
    """30 ones and 70 zeros: each resampled mean is Binomial(100, 0.3) / 100, whose quantiles are known exactly.
    With 20,000 resamples the 2.5 % point is pinned to levels 0.0195-0.0305, i.e. to 0.21-0.22 (97.5 %: 0.39-0.40);
    a 90 % interval (0.23, 0.38) or drawing without replacement (zero width) cannot pass."""
    samples = 20000
    mean, lo, hi = paired_bootstrap([1.0] * 30 + [0.0] * 70, samples=samples)
    cdf = np.cumsum([math.comb(100, k) * 0.3**k * 0.7 ** (100 - k) for k in range(101)])
    slack = 5 * math.sqrt(0.025 * 0.975 / samples)
    quantile = lambda level: int(np.searchsorted(cdf, level)) / 100  # noqa: E731
    assert mean == pytest.approx(0.3)
    assert quantile(0.025 - slack) <= lo <= quantile(0.025 + slack)
    assert quantile(0.975 - slack) <= hi <= quantile(0.975 + slack)


def test_paired_bootstrap_interval_has_the_normal_width_and_excludes_zero_only_for_a_real_difference():
    """400 normal differences (sd 0.5): the interval is mean +- 1.96 sd / sqrt(n) within 10 %, as the normal
    approximation of the mean says for n this large."""
    rng = np.random.default_rng(0)
    diffs = 0.3 + rng.standard_normal(400) * 0.5
    mean, lo, hi = paired_bootstrap(list(diffs))
    half = 1.96 * diffs.std(ddof=1) / math.sqrt(400)
    assert hi - lo == pytest.approx(2 * half, rel=0.1)
    assert (lo + hi) / 2 == pytest.approx(diffs.mean(), abs=0.1 * half)
    assert lo > 0
    mean, lo, hi = paired_bootstrap(list(rng.standard_normal(400) * 0.5))
    assert lo < 0 < hi
