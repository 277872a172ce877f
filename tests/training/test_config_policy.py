"""Configs cannot run code: a `_target_` stands only at the root of a component node and names only a projector
class (or a listed Lightning strategy), decided by what the object is (gemma_fusion/core/config.py).

A shared run directory or export whose config hides a command is refused by eval.py, infer and export with one
sentence, before anything is built, and the command never runs.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gemma_fusion.core.config import CONFIG_DIR, Buildable, check_targets, checked_instantiate
from gemma_fusion.core.errors import UserError
from gemma_fusion.training import recipe
from gemma_fusion.training.fsdp import trainer_options
from tests.training.conftest import compose_train

ROOT = Path(__file__).resolve().parents[2]
GROUPS = [p.relative_to(CONFIG_DIR).parent.as_posix() for p in sorted(Path(CONFIG_DIR).glob("**/*.yaml"))
          if p.parent != Path(CONFIG_DIR)]
OPTIONS = sorted({(group, p.stem) for group in GROUPS for p in (Path(CONFIG_DIR) / group).glob("*.yaml")})


# ---- the policy on the shipped configs

@pytest.mark.parametrize("group, option", OPTIONS)
def test_every_shipped_option_passes_the_policy(group, option):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"{group}={option}"])
    check_targets(cfg)
    if group == "trainer":  # the strategy is built from plain data (FSDP: its wrap policy and mixed precision)
        trainer_options(cfg.trainer)


def test_the_eval_config_passes_the_policy():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        check_targets(compose("eval"))


# ---- the policy itself

class _Recorder(Buildable):
    def __init__(self, **kwargs):
        self.kwargs = kwargs


def test_a_component_gets_its_arguments_as_data_and_built_objects_as_they_are(monkeypatch):
    from torch.distributed.fsdp import MixedPrecision

    monkeypatch.setenv("GEMMA_FUSION_TARGETS", "tests")

    built = checked_instantiate({"_target_": f"{__name__}._Recorder", "sizes": [1, 2], "inner": {"a": 1}},
                                "model.vision", precision=MixedPrecision())
    assert built.kwargs["inner"] == {"a": 1} and list(built.kwargs["sizes"]) == [1, 2]
    assert type(built.kwargs["precision"]) is MixedPrecision  # (Hydra would have made the dataclass a config)


@pytest.mark.parametrize("node, message", [
    ({"model": {"vision": {"_target_": f"{__name__}._Recorder", "x": {"_target_": f"{__name__}._Recorder"}}}},
     "model.vision.x._target_=tests.training.test_config_policy._Recorder is not allowed: a _target_ may only head"),
    ({"data": {"_target_": f"{__name__}._Recorder"}}, "data._target_=tests.training.test_config_policy._Recorder is"),
    ({"trainer": {"strategy": {"_target_": "lightning.pytorch.strategies.FSDPStrategy",
                               "auto_wrap_policy": {"_target_": "gemma_fusion.training.fsdp.auto_wrap_policy"}}}},
     "trainer.strategy.auto_wrap_policy._target_=gemma_fusion.training.fsdp.auto_wrap_policy is not allowed"),
    ({"trainer": {"strategy": {"_target_": "torch.distributed.fsdp.MixedPrecision"}}}, "is not allowed"),
    ({"model": {"audio": {"_target_": "lightning.pytorch.strategies.DDPStrategy"}}}, "is not allowed"),
    ({"model": {"vision": {"_target_": "gemma_fusion.core.config.Buildable.__subclasses__"}}},
     "it is a builtin_function_or_method, not a class"),
    ({"model": {"vision": {"_target_": "import os; os.system('true')"}}}, "is not allowed"),
    ({"model": {"vision": {"_target_": 3}}}, "model.vision._target_=3 is not allowed"),
])
def test_refused_targets(node, message, monkeypatch):
    monkeypatch.setenv("GEMMA_FUSION_TARGETS", "tests")  # even where this test module may be imported
    with pytest.raises(UserError, match=message.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")):
        check_targets(node)


def test_a_resolver_cannot_smuggle_a_nested_target_in():
    cfg = OmegaConf.create({"model": {"vision": {"_target_": "gemma_fusion.models.projectors.PatchEmbedder",
                                                 "eps": "${oc.create:{_target_: os.system, _args_: [true]}}"}}})
    with pytest.raises(UserError, match=r"model\.vision\.eps\._target_=os\.system is not allowed"):
        check_targets(cfg)


def test_the_listed_strategies_are_compared_by_identity():
    check_targets({"trainer": {"strategy": {"_target_": "lightning.pytorch.strategies.fsdp.FSDPStrategy"}}})
    check_targets({"trainer": {"strategy": {"_target_": "lightning.pytorch.strategies.DDPStrategy"}}})
    with pytest.raises(UserError, match="it is lightning.pytorch.strategies.deepspeed.DeepSpeedStrategy"):
        check_targets({"trainer": {"strategy": {"_target_": "lightning.pytorch.strategies.DeepSpeedStrategy"}}})


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """A user's own package: a design implementing the contract, a plain function and a plain torch module."""
    (tmp_path / "my_parts").mkdir()
    (tmp_path / "my_parts" / "__init__.py").write_text(textwrap.dedent("""
        import os

        from torch import nn

        from gemma_fusion.models.projectors import AudioFrameProjector


        class MyAudio(AudioFrameProjector):
            pass


        class PlainModule(nn.Module):
            pass


        def helper(command):
            os.system(command)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_parts"
    sys.modules.pop("my_parts", None)


def test_a_users_package_named_in_the_environment_may_add_designs_only(user_package, monkeypatch):
    design = {"model": {"audio": {"_target_": "my_parts.MyAudio"}}}
    with pytest.raises(UserError, match="GEMMA_FUSION_TARGETS=your_package"):
        check_targets(design)
    assert "my_parts" not in sys.modules  # refused unimported
    monkeypatch.setenv("GEMMA_FUSION_TARGETS", "other, my_parts")
    check_targets(design)
    for name in ("helper", "PlainModule", "os.system"):
        with pytest.raises(UserError, match=f"model.audio._target_=my_parts.{name} is not allowed"):
            check_targets({"model": {"audio": {"_target_": f"my_parts.{name}"}}})


# ---- shared run directories and exports that hide a command

@pytest.fixture(scope="module")
def shared(tiny_gemma4_dir, tiny_demo_dir, tmp_path_factory) -> dict[str, Path]:
    """A finished tiny run and its export, as someone would hand them over."""
    from gemma_fusion.export import export_run

    run = tmp_path_factory.mktemp("shared") / "run"
    recipe.train(compose_train(tiny_gemma4_dir, tiny_demo_dir, "trainer.max_steps=1", "eval_after_train=false",
                               "lora=none"), run)
    return {"run": run, "export": export_run(run, run.parent / "export", "none")}


def _hidden_commands(marker: Path) -> dict[str, tuple[str, callable]]:
    """case -> (the key the refusal names, an edit of the config that hides `touch marker`)."""
    def nested_system(cfg):
        cfg["model"]["vision"]["embed_dim"] = {"_target_": "gemma_fusion.core.config.os.system",
                                               "_args_": [f"touch {marker}"]}

    def nested_popen(cfg):
        cfg["model"]["vision"]["embed_dim"] = {"_target_": "torch.utils.cpp_extension.subprocess.Popen",
                                               "_args_": [["touch", str(marker)]]}

    def top_level_function(cfg):
        cfg["model"]["vision"] = {"_target_": "gemma_fusion.core.config.os.system", "_args_": [f"touch {marker}"]}

    return {"nested os.system": ("model.vision.embed_dim._target_", nested_system),
            "nested Popen through torch": ("model.vision.embed_dim._target_", nested_popen),
            "a function as the projector": ("model.vision._target_", top_level_function)}


def _refused(commands: list[tuple[list[str], int]], key: str, marker: Path) -> None:
    """Each (command, exit status) stops with that status and one sentence naming `key`, without a traceback, and
    `marker` is never made (the commands run side by side)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "GEMMA_FUSION_TARGETS")}
    procs = [(subprocess.Popen([sys.executable, *command], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True), status) for command, status in commands]
    for proc, status in procs:
        out = proc.communicate(timeout=300)[0]
        assert proc.returncode == status, out[-3000:]
        assert "Traceback" not in out, out[-3000:]
        error = [line for line in out.splitlines() if line.startswith("error: ")]
        assert len(error) == 1 and f"{key}=" in error[0] and "is not allowed" in error[0], out[-3000:]
    assert not marker.exists()


@pytest.mark.slow  # subprocesses or many steps: `pytest -m slow`, its own step in .ci/run
@pytest.mark.parametrize("case", list(_hidden_commands(Path("M"))))
def test_a_run_whose_config_hides_a_command_is_refused_by_every_entry_point(case, shared, tmp_path):
    marker, run = tmp_path / "MARKER", tmp_path / "run"
    key, edit = _hidden_commands(marker)[case]
    shutil.copytree(shared["run"], run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    edit(cfg)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    _refused([(["eval.py", f"run={run}"], 1),
              (["-m", "gemma_fusion.infer", f"run={run}", "prompt=hi"], 2),  # (infer's status for a usage error)
              (["-m", "gemma_fusion.export", f"run={run}", f"out={tmp_path / 'out'}", "quant=none"], 1)], key, marker)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["nested os.system", "a function as the projector"])
def test_an_export_whose_config_hides_a_command_is_refused(case, shared, tmp_path):
    """export.json embeds the run's config; eval.py and infer load exports (export takes runs only)."""
    marker, export = tmp_path / "MARKER", tmp_path / "export"
    key, edit = _hidden_commands(marker)[case]
    shutil.copytree(shared["export"], export)
    meta = json.loads((export / "export.json").read_text())
    edit(meta["config"])
    (export / "export.json").write_text(json.dumps(meta))
    _refused([(["eval.py", f"run={export}"], 1), (["-m", "gemma_fusion.infer", f"run={export}", "prompt=hi"], 2)],
             key, marker)
