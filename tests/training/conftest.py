"""Compose the real train.yaml and shrink it (tiny random backbone, a few demo samples, a few steps)."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from gemma_fusion.config import CONFIG_DIR


@pytest.fixture(scope="session")
def tiny_demo_dir(tmp_path_factory):
    from gemma_fusion.data.demo import ensure_demo_data

    return ensure_demo_data(tmp_path_factory.mktemp("demo") / "demo", train_per_task=6, val_per_task=2,
                            samples_per_shard=8, num_workers=1, progress=False)


@pytest.fixture
def make_cfg(tiny_gemma4_dir, tiny_demo_dir):
    """Returns compose(overrides) -> DictConfig of train.yaml shrunk to seconds of CPU."""

    def _make(*overrides: str):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose("train", overrides=[
                f"backbone.path={tiny_gemma4_dir}", "~backbone.pretrain",
                f"data.train={tiny_demo_dir}/train", f"data.val={tiny_demo_dir}/val", "data.prepare_demo=false",
                "data.batch_size=4", "data.eval_batch_size=4", "data.num_workers=0", "data.shuffle_buffer=0",
                "data.image_tokens=8", "trainer.max_steps=3", "trainer.enable_progress_bar=false",
                "optim.warmup_steps=1", "checkpoint.every_n_steps=0", *overrides,
            ])

    return _make
