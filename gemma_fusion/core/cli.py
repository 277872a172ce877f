"""The one command-line parser of every `python -m gemma_fusion.X` entry point.

A command declares its options as a dataclass, the schema: each field's type, default, one-line help
and range rule sit together, written with `option(...)`. `parse_cli(Schema, argv, prog)` turns the
command line into a Schema instance. Every command reads the same forms, all naming the same keys:

    key=value                  Hydra's override grammar: 5, 0.5, true, null, [a,b], "quoted, = inside"
    --key value, --key=value   the same key (dashes read as underscores: --samples-per-shard)
    --flag, --no-flag          a bool key set true / false
    VALUE                      the schema's positional keys, in their order

A str or path key takes the text after `=` as it is (a prompt holds commas, apostrophes, any letter,
which Hydra's grammar refuses); a value wholly in quotes is unquoted as Hydra does, and `null` is None
where the key allows None. A `rest=True` key collects every other `key=value` / `~key` / `+key=value`
(overrides a command hands on to `configs/train.yaml`).

`-h` / `--help` prints the usage line and every key with its type, default and help, and exits 0. A
mistake (an unknown key, whose message lists the valid ones; a value of the wrong type; out of range or
not among the choices; a required key missing; a schema's own `validate()` refusing a combination) is
one sentence on stderr and exit status 2 (a traceback with HYDRA_FULL_ERROR=1).

Why not `hydra.compose` over a ConfigStore entry: compose is this same override parser followed by an
OmegaConf merge into the structured schema, plus a process-wide Hydra instance (which clashes with
commands such as `data.inspect` that compose train.yaml themselves) and messages written for config
trees. Here the grammar is Hydra's `OverridesParser` and the type conversion OmegaConf's, on the same
dataclass; the messages are the project's one sentence.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import MISSING, OmegaConf

from gemma_fusion.core.errors import UserError, sentence

T = TypeVar("T")
HELP_FLAGS = ("-h", "--help")
_KEY = re.compile(r"[A-Za-z_][\w.]*\Z")  # what may stand before `=` (dotted for pass-through overrides)
_OVERRIDES = OverridesParser.create()


def option(default: Any = MISSING, help: str = "", *, choices: Sequence | None = None, ge: float | None = None,
           gt: float | None = None, le: float | None = None, rule: tuple[Callable[[Any], bool], str] | None = None,
           positional: bool = False, metavar: str | None = None, rest: bool = False) -> Any:
    """A schema field: `default` (leave it out for a required key), one line of `help`, and its rules.

    choices: the values allowed. ge / gt / le: bounds of a number (a bounded float must also be finite).
    rule: (predicate, what it demands), e.g. `(lambda v: v % 2 == 0, "even")`. positional: may be given
    bare, in field order. metavar: the value's name in messages (`run=PATH`). rest: a list[str] field
    that collects the overrides the schema has no key for.
    """
    meta = dict(help=help, choices=tuple(choices) if choices else None, ge=ge, gt=gt, le=le, rule=rule,
                positional=positional, metavar=metavar, rest=rest)
    if rest:
        return dataclasses.field(default_factory=list, metadata=meta)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class _Key:
    """One schema field as the parser sees it: `kind` is str, Path, int, float, bool, list or dict."""

    name: str
    kind: type
    shown: str  # the type as --help shows it: int, path, list[str]
    optional: bool
    default: Any
    meta: dict

    @property
    def required(self) -> bool:
        return self.default is MISSING

    @property
    def text(self) -> bool:  # taken verbatim, not through Hydra's grammar
        return self.kind in (str, Path)

    def form(self) -> str:
        """How messages spell the key: SPEC, --flag or key=VALUE."""
        metavar = self.meta.get("metavar") or self.name.upper()
        if self.meta.get("positional"):
            return metavar
        return f"--{self.name.replace('_', '-')}" if self.kind is bool else f"{self.name}={metavar}"

    def type_name(self) -> str:
        return f"{self.shown} | null" if self.optional else self.shown

    def bounds(self) -> str | None:
        """The range rule in words: '>= 1', 'in (0, 1]', 'one of a, b', 'even', or None."""
        m = self.meta
        parts = []
        if m.get("choices"):
            parts.append("one of " + ", ".join(map(_show, m["choices"])))
        low = (f"[{m['ge']:g}" if m.get("ge") is not None else f"({m['gt']:g}" if m.get("gt") is not None else None)
        if low and m.get("le") is not None:
            parts.append(f"in {low}, {m['le']:g}]")
        elif low:
            parts.append(f"{'>=' if low[0] == '[' else '>'} {low[1:]}")
        elif m.get("le") is not None:
            parts.append(f"<= {m['le']:g}")
        if m.get("rule"):
            parts.append(m["rule"][1])
        return ", ".join(parts) or None

    def example(self) -> str:
        if not self.required and self.default is not None and not isinstance(self.default, (list, dict)):
            return _show(self.default)
        return {int: "1", float: "0.5", bool: "true", list: "[a,b]", dict: "{a:1}"}.get(self.kind, "VALUE")


def _show(value: Any) -> str:
    """A value as it is typed on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return str(value).replace(" ", "").replace("'", "")
    return str(value)


def schema_keys(schema: type) -> dict[str, _Key]:
    """The schema's fields in order, with their types read from the annotations."""
    hints = typing.get_type_hints(schema)
    keys = {}
    for f in dataclasses.fields(schema):
        tp, optional = hints[f.name], False
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            tp, optional = args[0], len(args) < len(typing.get_args(tp))
        kind = typing.get_origin(tp) or tp
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else MISSING)
        shown = {Path: "path"}.get(tp) or (tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", ""))
        keys[f.name] = _Key(f.name, kind, shown, optional, default, dict(f.metadata))
    return keys


def parse(schema: type[T], argv: Sequence[str]) -> T:
    """`argv` -> a `schema` instance, typed and checked; a UserError (one sentence) names the mistake."""
    keys = schema_keys(schema)
    rest = next((k for k in keys.values() if k.meta.get("rest")), None)
    conf = OmegaConf.structured(schema)  # converts and type-checks the values that are not text
    given: dict[str, Any] = {}
    extra: list[str] = []
    tokens, i = list(argv), 0
    while i < len(tokens):
        arg, i = tokens[i], i + 1
        name, eq, raw = arg.partition("=")
        if arg.startswith("--") and len(arg) > 2:
            name = name[2:].replace("-", "_")
            key = keys.get(name)
            if key is None and not eq and name.startswith("no_") and getattr(keys.get(name[3:]), "kind", 0) is bool:
                key, raw, eq = keys[name[3:]], "false", "="
            if key is None or key is rest:
                raise _unknown(arg, keys)
            if not eq and key.kind is bool:
                raw = "true"
            elif not eq:
                if i == len(tokens):
                    raise UserError(f"{arg} needs a value, e.g. {arg} {key.example()}.")
                raw, i = tokens[i], i + 1
            given[key.name] = _convert(key, raw, conf)
        elif eq and _KEY.match(name) and name in keys and keys[name] is not rest:
            given[name] = _convert(keys[name], raw, conf)
        elif rest and (arg.startswith(("~", "+")) or (eq and _KEY.match(name))):
            extra.append(arg)
        elif not arg.startswith("-") and not (eq and _KEY.match(name)) and (slot := next(
                (k for k in keys.values() if k.meta.get("positional") and k.name not in given), None)):
            given[slot.name] = _convert(slot, arg, conf)
        elif rest and not arg.startswith("-"):
            extra.append(arg)
        else:
            raise _unknown(arg, keys)
    for key in keys.values():
        if key.required and key.name not in given:
            what = key.meta.get("help", "").rstrip(".")
            raise UserError(f"{key.form()} is required" + (f": {what}." if what else "."))
    if rest:
        given[rest.name] = extra
    for name, value in given.items():
        _check(keys[name], value)
    options = schema(**given)
    if callable(getattr(options, "validate", None)):
        options.validate()
    return options


def _unknown(arg: str, keys: dict[str, _Key]) -> UserError:
    valid = ", ".join(k.form() if k.kind is bool or k.meta.get("positional") else f"{k.name}=..."
                      for k in keys.values() if not k.meta.get("rest"))
    return UserError(f"unknown argument '{arg}'; valid are {valid} (--help explains each).")


def _convert(key: _Key, raw: str, conf) -> Any:
    """The text after `=` -> the key's type (Hydra's grammar, OmegaConf's conversion)."""
    if key.text:
        if raw == "null" and key.optional:
            return None
        if len(raw) > 1 and raw[0] == raw[-1] and raw[0] in "'\"":
            try:
                value = _OVERRIDES.parse_override(f"v={raw}").value()
                raw = value if isinstance(value, str) else raw
            except Exception:  # not one quoted string after all (Hydra raises its own HydraException)
                pass
        return key.kind(raw)
    try:
        override = _OVERRIDES.parse_override(f"v={raw}")
        if override.is_sweep_override():
            raise ValueError(raw)
        conf[key.name] = override.value()
        value = conf[key.name]
        return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    except Exception:  # Hydra's grammar (HydraException) or OmegaConf's conversion (ValidationError) refused it
        raise UserError(f"{key.name}={raw} is not a valid {key.shown}; pass e.g. {key.name}={key.example()}.") from None


def _check(key: _Key, value: Any) -> None:
    """Choices, bounds and rule of one given value (None passes: the type allowed it)."""
    m = key.meta
    if value is None or key.meta.get("rest"):
        return
    if m.get("choices") and value not in m["choices"]:
        raise UserError(f"{key.name}={_show(value)} is not one of {', '.join(map(_show, m['choices']))}.")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = not number or ((m.get("ge") is None or value >= m["ge"]) and (m.get("gt") is None or value > m["gt"])
                        and (m.get("le") is None or value <= m["le"]))
    bounded = number and any(m.get(b) is not None for b in ("ge", "gt", "le"))
    if (bounded and not (ok and math.isfinite(value))) or (m.get("rule") and not m["rule"][0](value)):
        raise UserError(f"{key.name}={value} is out of range; it must be {key.bounds()}.")


def usage(schema: type, prog: str) -> str:
    """The `--help` text: usage line, the schema's docstring, then every key (type, default, help)."""
    keys = schema_keys(schema)
    line = [f"usage: {prog}"]
    for k in keys.values():
        if k.meta.get("positional"):
            line.append(k.form() if k.required else f"[{k.form()}]")
    line += [k.form() for k in keys.values() if k.required and not k.meta.get("positional")]
    optional = [k for k in keys.values() if not k.required and not k.meta.get("rest") and not k.meta.get("positional")]
    if any(k.kind is not bool for k in optional):
        line.append("[key=value ...]")
    line += [f"[--{'no-' * (k.default is True)}{k.name.replace('_', '-')}]" for k in optional if k.kind is bool]
    rest = [k for k in keys.values() if k.meta.get("rest")]
    if rest:
        line.append(f"[{rest[0].meta.get('metavar') or 'overrides'} ...]")
    rows = []
    for k in keys.values():
        if k.meta.get("rest"):
            continue
        default = "(required)" if k.required else _show(k.default)
        what = k.meta.get("help", "") + (f" ({k.bounds()})" if k.bounds() else "")
        where = " (positional)" if k.meta.get("positional") else ""
        rows.append((k.name + where, k.type_name(), default, what))
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    table = [("  " + "  ".join(r[c].ljust(widths[c]) for c in range(3)) + "  " + r[3]).rstrip() for r in rows]
    doc = inspect.cleandoc(schema.__doc__ or "")
    forms = ("keys (key=value in Hydra's override grammar, or --key value / --key=value; a bool alone as --key is "
             "true, --no-key false):")
    tail = [f"{rest[0].name}: {rest[0].meta.get('help')}"] if rest else []
    return "\n".join([" ".join(line), "", doc, "", forms, *table, *([""] + tail if tail else [])])


def parse_cli(schema: type[T], argv: Sequence[str] | None = None, *, prog: str) -> T:
    """The command line (`sys.argv[1:]` by default) -> a `schema` instance.

    `-h` / `--help` prints `usage(schema, prog)` and exits 0; a mistake prints one sentence and exits 2.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in HELP_FLAGS for a in argv):
        print(usage(schema, prog))
        raise SystemExit(0)
    return call_or_exit(parse, schema, argv, status=2)


def call_or_exit(fn: Callable[..., T], *args: Any, status: int = 2) -> T:
    """`fn(*args)`; a UserError prints `error: <its sentence>` on stderr and exits with `status`."""
    try:
        return fn(*args)
    except UserError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {sentence(err)}", file=sys.stderr)
        raise SystemExit(status) from None
