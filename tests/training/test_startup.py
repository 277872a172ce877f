"""Every check that needs no model runs before any preparation: a typo in a shard path or the demo group pointed at
shards of your own stops with one sentence in seconds, before the demo data is generated or the tiny backbone
pretrained (minutes), and before the run directory gets its config.yaml."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from gemma_fusion.core.config import CONFIG_DIR
from gemma_fusion.core.errors import UserError
from gemma_fusion.training import recipe
from gemma_fusion.training.startup import check_demo_paths, demo_dir

ROOT = Path(__file__).resolve().parents[2]


def _train(*args: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=env)
    return proc.returncode, proc.stdout + proc.stderr


def _demo_data(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides)).data


def test_a_typo_in_the_shards_stops_before_the_backbone_is_pretrained(tmp_path):
    typo = tmp_path / "typo" / "shard-{000..009}.tar"
    code, out = _train(f"hydra.run.dir={tmp_path / 'run'}", f"backbone.path={tmp_path / 'backbone'}",
                       "data=shards", f"data.train='{typo}'", f"data.val={tmp_path / 'typo'}")
    assert code == 1, out[-2000:]
    assert f"error: data.train: The shard pattern '{typo}' names 10 shards but 10 do not exist" in out, out[-2000:]
    assert "Traceback" not in out
    assert not (tmp_path / "backbone").exists()  # backbone=tiny pretrains it there (minutes) when it gets that far
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_the_demo_group_on_shards_of_your_own_says_to_use_data_shards(tmp_path):
    mine = tmp_path / "mine"
    for split in ("train", "val"):
        (mine / split).mkdir(parents=True)
        (mine / split / "shard-000000.tar").write_bytes(b"my data")
    code, out = _train(f"hydra.run.dir={tmp_path / 'run'}", f"backbone.path={tmp_path / 'backbone'}",
                       f"data.train={mine}/train", f"data.val={mine}/val")
    assert code == 1, out[-2000:]
    assert f"error: data.train={mine}/train is not the demo's data" in out and "pass data=shards" in out, out[-2000:]
    assert "Traceback" not in out
    assert sorted(p.name for p in mine.iterdir()) == ["train", "val"]  # the demo generator never touched them
    assert (mine / "train" / "shard-000000.tar").read_bytes() == b"my data"
    assert not (tmp_path / "backbone").exists() and not (tmp_path / "run" / "config.yaml").exists()


def test_the_demo_group_with_a_shard_pattern_stops_before_anything_is_generated(tmp_path):
    code, out = _train(f"hydra.run.dir={tmp_path / 'run'}", f"backbone.path={tmp_path / 'backbone'}",
                       f"data.train='{tmp_path / 'typo'}/shard-{{000..009}}.tar'", f"data.val={tmp_path / 'demo'}/val")
    assert code == 1, out[-2000:]
    assert "is not the demo's data" in out and "data=shards data.train=" in out and "Traceback" not in out
    assert not (tmp_path / "typo").exists() and not (tmp_path / "demo").exists()
    assert not (tmp_path / "backbone").exists()


def test_the_demo_group_accepts_directories_it_may_write(tiny_demo_dir, tmp_path):
    check_demo_paths(_demo_data())  # configs/data/demo.yaml as it is (data/demo, generated on first use)
    assert Path(str(_demo_data().train)).parent == demo_dir()
    check_demo_paths(_demo_data("experiment=smoke"))  # data/demo_smoke: a directory of its own
    new = (f"data.train={tmp_path}/new/train", f"data.val={tmp_path}/new/val")
    check_demo_paths(_demo_data(*new, f"data.test={tmp_path}/new/test"))  # to be made
    check_demo_paths(_demo_data(*new, "data.test=null"))
    with pytest.raises(UserError, match=r"^data\.test=.*/data/demo/test is not the test split of .*: pass data\.test="):
        check_demo_paths(_demo_data(*new))  # the default data.test, another directory's
    check_demo_paths(_demo_data(f"data.train={tiny_demo_dir}/train", f"data.val={tiny_demo_dir}/val",
                                f"data.test={tiny_demo_dir}/test"))  # made before
    with pytest.raises(UserError, match=r"^data\.val=.* is not the demo's data .*: pass data=shards"):
        check_demo_paths(_demo_data(f"data.train={tiny_demo_dir}/train", f"data.val={tmp_path}/val"))
    (tmp_path / "mine" / "train").mkdir(parents=True)
    with pytest.raises(UserError, match=r"^data\.train=.* is not the demo's data"):
        check_demo_paths(_demo_data(f"data.train={tmp_path}/mine/train", f"data.val={tmp_path}/mine/val"))


@pytest.mark.parametrize("override, sentence", [
    ("model.init_from=NOWHERE", r"^model\.init_from=.* has no final/trainable\.safetensors"),
    ("resume=NOWHERE/last.ckpt", r"^resume=.* is not a checkpoint file"),
    ("data.val=NOWHERE", r"^data\.val: "),
    ("backbone.path=NOWHERE", r"^backbone\.path=.* does not exist or is not a directory"),
])
def test_setup_stops_before_the_run_directory_is_written(override, sentence, make_cfg, tmp_path):
    with pytest.raises(UserError, match=sentence):
        recipe.setup(make_cfg(override.replace("NOWHERE", str(tmp_path / "nowhere"))), tmp_path / "run")
    assert not (tmp_path / "run").exists()
