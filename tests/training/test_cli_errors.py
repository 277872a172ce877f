"""Mistakes on the command line of train.py: each stops with one sentence that says what, where and what to do, and
no traceback unless HYDRA_FULL_ERROR=1 asks for one."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _train(*args: str, full_error: bool = False) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=env)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture
def tiny_args(tiny_gemma4_dir, tiny_demo_dir, tmp_path):
    return [f"hydra.run.dir={tmp_path / 'run'}", f"backbone.path={tiny_gemma4_dir}", "~backbone.pretrain",
            f"data.train={tiny_demo_dir}/train", f"data.val={tiny_demo_dir}/val", "data.prepare_demo=false",
            "trainer.max_steps=1"]


@pytest.mark.parametrize("override, sentence", [
    ("+model.vision.out_dim=32", "error: The vision projector outputs width 32 but the backbone's hidden size is 64"),
    ("model.audio._target_=os.system", "error: model.audio._target_=os.system is not allowed"),
    ("data.train=MISSING/shard-*.tar", "error: data.train: The shard pattern 'MISSING/shard-*.tar' matches no .tar "
                                       "files (in MISSING: ['notes.txt'])"),
    ("trainer.max_steps=abc", "error: trainer.max_steps=abc is not an integer (its default is"),
    ("optim.lr=fast", "error: optim.lr holds several keys (vision, audio, lora, backbone)"),
    ("data.batch_size=0", "error: data.batch_size=0 is out of range: it must be an integer >= 1."),
    # nothing passes (every sample too long): the loader workers stop it before any batch could form
    ("data.max_length=3 data.num_workers=2 data.bad_check_after=20",
     "error: 20 of 20 samples so far were bad (too_long: 20), more than data.max_bad_fraction=0.05"),
])
def test_a_mistake_is_one_sentence_without_a_traceback(override, sentence, tiny_args, tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "notes.txt").write_text("not a shard")
    override, sentence = (text.replace("MISSING", str(tmp_path / "shards")) for text in (override, sentence))
    code, out = _train(*tiny_args, *override.split())
    assert code == 1, out[-2000:]
    assert sentence in out, out[-2000:]
    assert "Traceback" not in out
    assert not (tmp_path / "run" / "final").exists()


def test_hydra_full_error_shows_the_traceback(tiny_args):
    code, out = _train(*tiny_args, "+model.vision.out_dim=32", full_error=True)
    assert code == 1
    assert "Traceback" in out and "vision projector outputs width 32 but the backbone's hidden size is 64" in out


@pytest.mark.parametrize("override, rule", [
    ("data.batch_size=0", "an integer >= 1"), ("data.image_tokens=-3", "an integer >= 1"),
    ("data.num_workers=-1", "an integer >= 0"), ("data.max_bad_fraction=1.5", "a number from 0 to 1"),
    ("data.max_image_megapixels=0", "a number > 0"), ("data.audio_max_seconds=0", "null or a number > 0"),
    ("optim.lr.vision=-0.1", "a number >= 0 (0 freezes that part)"), ("optim.warmup_steps=-5", "an integer >= 0"),
    ("lora.r=-4", "an integer >= 0"), ("checkpoint.every_n_steps=-1", "an integer >= 0"),
    ("trainer.max_steps=0", "an integer >= 1 (or -1 with trainer.max_epochs)"),
])
def test_a_value_out_of_range_stops_at_start_up(override, rule, make_cfg, tmp_path):
    from gemma_fusion.training import recipe

    from gemma_fusion.core.errors import UserError

    key, value = override.split("=")
    with pytest.raises(UserError, match=f"^{key}={value} is out of range: it must be {rule}".replace("(", r"\(")
                       .replace(")", r"\)")):
        recipe.train(make_cfg(override), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_every_shipped_preset_passes_the_range_checks():
    from hydra import compose, initialize_config_dir

    from gemma_fusion.core.config import CONFIG_DIR, check_values

    presets = [p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml")]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for overrides in ([], ["data=shards"], ["lora=none"], *([f"experiment={name}"] for name in presets)):
            check_values(compose("train", overrides=overrides))


@pytest.mark.parametrize("override, sentence", [
    ("trainer.precision=fp8", r"^trainer: Lightning rejects these settings \(Precision 'fp8' is invalid"),
    ("lora.target_modules=[nope]", r"^lora.target_modules=\['nope'\] cannot be adapted .* the backbone's linear "
                                   r"layers are named down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj\.$"),
])
def test_a_setting_a_library_rejects_is_one_sentence_naming_the_key(override, sentence, make_cfg, tmp_path):
    from gemma_fusion.training import recipe

    from gemma_fusion.core.errors import UserError

    with pytest.raises(UserError, match=sentence):
        recipe.train(make_cfg(override), tmp_path / "run")


def test_data_where_nothing_passes_stops_before_any_batch(make_cfg, tmp_path):
    """Every sample too long: without the loader's own check no batch would ever form and the run would hang."""
    from gemma_fusion.training import recipe

    from gemma_fusion.core.errors import UserError

    with pytest.raises(UserError, match=r"^20 of 20 samples so far were bad \(too_long: 20\)"):
        recipe.train(make_cfg("data.max_length=3", "data.bad_check_after=20", "data.resampled=true"),
                           tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.csv").exists() or "train/loss" not in (tmp_path / "run" /
                                                                                   "metrics.csv").read_text()
