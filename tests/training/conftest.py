"""Compose the real train.yaml and shrink it (tiny random backbone, a few demo samples, a few steps)."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback

from gemma_fusion.core.config import CONFIG_DIR
from gemma_fusion.training import callbacks


@pytest.fixture(scope="session")
def tiny_demo_dir(tmp_path_factory):
    from gemma_fusion.data.demo import ensure_demo_data

    return ensure_demo_data(tmp_path_factory.mktemp("demo") / "demo", train_per_task=6, val_per_task=2,
                            test_per_task=2, samples_per_shard=8, num_workers=1, progress=False)


@pytest.fixture(scope="session")
def even_demo_dir(tmp_path_factory):
    """4 train shards of 6 samples (two per rank: both ranks of a 2-process run have data for every step) and
    2 val shards (an evaluation that read only rank 0's share would report n = 6, not 12)."""
    from gemma_fusion.data.demo import ensure_demo_data

    return ensure_demo_data(tmp_path_factory.mktemp("demo") / "demo", train_per_task=8, val_per_task=4,
                            test_per_task=2, samples_per_shard=6, num_workers=1, progress=False)


def compose_train(backbone, demo, *overrides: str):
    """train.yaml on `backbone` and the demo data in `demo`, shrunk to seconds of CPU."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=[
            f"backbone.path={backbone}", "backbone.pretrain=null",
            f"data.train={demo}/train", f"data.val={demo}/val", "data.prepare_demo=false",
            "data.batch_size=4", "data.eval_batch_size=4", "data.num_workers=0", "data.shuffle_buffer=0",
            "data.image_tokens=8", "trainer.max_steps=3", "trainer.enable_progress_bar=false",
            "optim.warmup_steps=1", "checkpoint.every_n_steps=0", *overrides,
        ])


@pytest.fixture
def make_cfg(tiny_gemma4_dir, tiny_demo_dir):
    """Returns compose(overrides) -> DictConfig of train.yaml shrunk to seconds of CPU."""
    return lambda *overrides: compose_train(tiny_gemma4_dir, tiny_demo_dir, *overrides)


class StartWeights(Callback):
    """Every parameter of the run's FusionModel as fitting starts (seeded, built, `init_from` loaded): the run's
    own before-state, to compare the trained weights with."""

    def __init__(self):
        self.weights = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.weights = {n: p.detach().clone() for n, p in pl_module.net.named_parameters()}


@pytest.fixture
def start_weights(monkeypatch) -> StartWeights:
    """Records the start weights of every `recipe.train` in the test (the last one's are kept)."""
    recorder, build = StartWeights(), callbacks.build_callbacks
    monkeypatch.setattr(callbacks, "build_callbacks", lambda cfg, run_dir: [*build(cfg, run_dir), recorder])
    return recorder
