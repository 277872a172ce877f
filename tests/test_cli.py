"""The one override parser of every `python -m gemma_fusion.X` command (gemma_fusion/core/cli.py)."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import pytest

from gemma_fusion.cli import COMMANDS
from gemma_fusion.core.cli import option, parse, schema_keys, usage
from gemma_fusion.core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Toy:
    """A toy command."""

    spec: str = option(help="what to read", positional=True, metavar="SPEC")
    run: str = option(help="a run directory", metavar="PATH")
    steps: int = option(64, "steps to take", ge=1)
    top_p: float = option(1.0, "probability mass", gt=0, le=1)
    quant: str = option("bf16", "weights", choices=("bf16", "int8"))
    group: int = option(64, "inputs per scale", rule=(lambda v: v % 2 == 0, "even"))
    strict: bool = option(False, "stop at the first bad row")
    cache: bool = option(True, "keep a cache")
    out: Path | None = option(None, "where to write")
    tags: list[str] = option([], "labels")
    first: str | None = option(None, "exclusive with second")
    second: str | None = option(None, "exclusive with first")

    def validate(self) -> None:
        if self.first and self.second:
            raise UserError("pass first= or second=, not both.")


@dataclass
class ToyWithRest(Toy):
    """A toy command that hands unknown overrides on (as data.inspect does to train.yaml)."""

    overrides: list[str] = option(help="the rest", rest=True, metavar="overrides")


def test_every_form_names_the_same_keys():
    got = parse(ToyWithRest, ["data/x", "run=r", "--steps", "5", "--top-p=0.5", "--strict", "--no-cache",
                              "tags=[a,b]", "--out", "null", "a.b=1", "~c", "+d=2"])
    assert got == ToyWithRest(spec="data/x", run="r", steps=5, top_p=0.5, strict=True, cache=False, tags=["a", "b"],
                      out=None, overrides=["a.b=1", "~c", "+d=2"])
    assert parse(Toy, ["spec=s", "--run", "r", "strict=true", "out=o"]) == Toy(spec="s", run="r", strict=True,
                                                                              out=Path("o"))


def test_text_values_are_taken_as_they_are_and_quotes_as_hydra_reads_them():
    assert parse(Toy, ["s", "run=Qu'est-ce, ça? a=b"]).run == "Qu'est-ce, ça? a=b"  # Hydra's grammar refuses this
    assert parse(Toy, ["s", 'run="spaces and = inside"']).run == "spaces and = inside"
    assert parse(Toy, ["s", "run=r", "tags=['a b',c]"]).tags == ["a b", "c"]
    assert parse(Toy, ["s", "run=r", "first=null"]).first is None


@pytest.mark.parametrize("argv, sentence", [
    (["s", "run=r", "stpes=5"], "unknown argument 'stpes=5'; valid are SPEC, run=..., steps=..., top_p=..., "
                                "quant=..., group=..., --strict, --cache, out=..., tags=..., first=..., second=..."),
    (["s", "run=r", "--bogus"], "unknown argument '--bogus'"),
    (["s", "run=r", "steps=many"], "steps=many is not a valid int; pass e.g. steps=64."),
    (["s", "run=r", "steps=1.5"], "steps=1.5 is not a valid int"),
    (["s", "run=r", "strict=maybe"], "strict=maybe is not a valid bool"),
    (["s", "run=r", "tags=[a,"], "tags=[a, is not a valid list[str]"),
    (["s", "run=r", "steps=0"], "steps=0 is out of range; it must be >= 1."),
    (["s", "run=r", "top_p=2"], "top_p=2.0 is out of range; it must be in (0, 1]."),
    (["s", "run=r", "top_p=nan"], "top_p=nan is out of range"),
    (["s", "run=r", "group=3"], "group=3 is out of range; it must be even."),
    (["s", "run=r", "quant=fp8"], "quant=fp8 is not one of bf16, int8."),
    (["s"], "run=PATH is required: a run directory."),
    (["run=r"], "SPEC is required: what to read."),
    (["s", "run=r", "--steps"], "--steps needs a value, e.g. --steps 64."),
    (["s", "run=r", "first=a", "second=b"], "pass first= or second=, not both."),
])
def test_a_mistake_is_one_sentence(argv, sentence):
    with pytest.raises(UserError) as err:
        parse(Toy, argv)
    assert str(err.value).startswith(sentence) and "\n" not in str(err.value)


def test_help_shows_every_key_with_type_default_and_rule():
    text = usage(ToyWithRest, "python -m toy")
    assert text.startswith("usage: python -m toy SPEC run=PATH [key=value ...] [--strict] [--no-cache] [overrides ...]")
    assert "A toy command that hands unknown overrides on" in text and "overrides: the rest" in text
    row = next(line for line in text.splitlines() if line.strip().startswith("top_p"))
    assert row.split()[:3] == ["top_p", "float", "1"] and row.endswith("probability mass (in (0, 1])")


def _schema(module: str):
    return getattr(importlib.import_module(module), COMMANDS[module])


@pytest.fixture(scope="module")
def helps():
    """`python -m X --help` of every command, started together (each start imports torch)."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    procs = {m: subprocess.Popen([sys.executable, "-m", m, "--help"], cwd=ROOT, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for m in COMMANDS}
    return {m: (*p.communicate(timeout=300), p.returncode) for m, p in procs.items()}


@pytest.mark.parametrize("module", list(COMMANDS))
def test_every_command_lists_its_keys_and_refuses_a_bad_one_in_one_line(module, helps, capsys, monkeypatch):
    stdout, stderr, code = helps[module]
    assert code == 0, stderr
    assert stdout.startswith(f"usage: python -m {module}")
    listed = {line.split()[0] for line in stdout.splitlines() if line.startswith("  ")}
    schema = _schema(module)
    assert listed == {k.name for k in schema_keys(schema).values() if not k.meta.get("rest")}
    assert {f.name for f in fields(schema)} - listed <= {"overrides"}

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    main = importlib.import_module(module).main
    typed = next(k for k in schema_keys(schema).values() if k.kind in (int, float, bool))
    messages = []
    for argv, needle in ((["--no-such-key"], "unknown argument '--no-such-key'; valid are "),
                         ([f"{typed.name}=not-a-number"], f"{typed.name}=not-a-number is not a valid")):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.startswith(f"error: {needle}") and len(err.strip().splitlines()) == 1
        messages.append(err)
    assert all(k.form() in messages[0] if k.kind is bool or k.meta.get("positional") else f"{k.name}=..." in messages[0]
               for k in schema_keys(schema).values() if not k.meta.get("rest"))
