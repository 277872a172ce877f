"""Generate from a trained run or an export: `python -m gemma_fusion.infer run=RUN [image=] [audio=] prompt="…"`.

The text streams to stdout as tokens arrive; stderr gets the time to first token and the decode speed.
`prompts=FILE.jsonl` answers one prompt per line (`{"prompt", "image"?, "audio"?, "id"?}`) and writes one
JSON line per prompt (`{"id", "prompt", "output", "ttft_s", "tokens_per_s"}`) to `out=` (default stdout).
Options: max_new_tokens=64, temperature=0 (greedy; > 0 samples, with top_k=0 (all), top_p=1.0 and seed=0),
device=auto (cuda if available), batch_size=8 (prompts per batch in prompts= mode), trust_remote_code=false
(a run on a backbone that ships its own code loads only with true). Relative paths are
relative to the working directory. The sample is built exactly as the run's data loader builds one.
A mistake (unknown option, bad value, missing file) ends with one sentence and exit status 2.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from gemma_fusion.core.errors import UserError
from gemma_fusion.artifacts.load import load_for_inference

if TYPE_CHECKING:
    from gemma_fusion.inference.prompts import Request


def switch(value: str) -> bool:
    """true / false (also 1 / 0, yes / no) -> bool; anything else is a ValueError."""
    if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(value)
    return value.lower() in ("true", "1", "yes")


OPTIONS = {"run": str, "prompt": str, "image": str, "audio": str, "prompts": str, "out": str, "max_new_tokens": int,
           "temperature": float, "top_k": int, "top_p": float, "seed": int, "device": str, "batch_size": int,
           "trust_remote_code": switch}
DEFAULTS = dict(prompt=None, image=None, audio=None, prompts=None, out=None, max_new_tokens=64, temperature=0.0,
                top_k=0, top_p=1.0, seed=0, device="auto", batch_size=8, trust_remote_code=False)
RANGES = (("max_new_tokens", lambda v: v >= 1, ">= 1"), ("batch_size", lambda v: v >= 1, ">= 1"),
          ("top_k", lambda v: v >= 0, ">= 0"), ("temperature", lambda v: v >= 0, ">= 0"),
          ("top_p", lambda v: 0 < v <= 1, "in (0, 1]"))


def parse_args(argv: list[str]) -> dict:
    """`key=value` arguments -> options (defaults filled in); a UserError names what is wrong."""
    args = dict(DEFAULTS)
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq or key not in OPTIONS:
            raise UserError(f"unknown argument '{arg}'; pass key=value with key one of {', '.join(OPTIONS)}.")
        try:
            args[key] = OPTIONS[key](value)
        except ValueError:
            raise UserError(f"{key}={value} is not a valid {OPTIONS[key].__name__}.") from None
    if "run" not in args:
        raise UserError("run=PATH is required: a directory written by train.py or by gemma_fusion.export.")
    if (args["prompt"] is None) == (args["prompts"] is None):
        raise UserError("pass either prompt=TEXT (with optional image= and audio=) or prompts=FILE.jsonl.")
    if args["prompts"] is not None and (args["image"] or args["audio"]):
        raise UserError("with prompts=FILE.jsonl give each prompt's image and audio in its line, not as image=/audio=.")
    for key, ok, rule in RANGES:
        if not ok(args[key]):
            raise UserError(f"{key}={args[key]} is out of range; it must be {rule}.")
    return args


def read_requests(args: dict) -> list[Request]:
    """The prompts to answer, with their media paths checked (before any model is loaded)."""
    from gemma_fusion.inference.prompts import Request

    if args["prompts"] is None:
        lines, where = [{"prompt": args["prompt"], "image": args["image"], "audio": args["audio"]}], None
    else:
        where = Path(args["prompts"])
        if not where.is_file():
            raise UserError(f"prompts={where} does not exist; pass a JSONL file with one JSON object per line.")
        lines = []
        for n, line in enumerate(where.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not (isinstance(row, dict) and isinstance(row.get("prompt"), str)):
                raise UserError(f"{where} line {n} is not a JSON object with a string 'prompt'.")
            lines.append({"id": len(lines), **row})
    requests = []
    for row in lines:
        paths = {}
        for kind in ("image", "audio"):
            if row.get(kind) is not None:
                paths[kind] = Path(row[kind])
                if not paths[kind].is_file():
                    line = "" if where is None else f" (in {where}, prompt id {row['id']})"
                    raise UserError(f"{kind}={row[kind]}{line} does not exist or is not a file.")
        requests.append(Request(row["prompt"], paths.get("image"), paths.get("audio"), row.get("id")))
    return requests


def run(args: dict) -> list[dict]:
    import torch

    from gemma_fusion.inference.prompts import answer, prompt_preprocessor

    requests = read_requests(args)
    device = args["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError:
        raise UserError(f"device={device} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={device} was asked for but no CUDA device is available; use device=cpu.")
    model, cfg = load_for_inference(args["run"], args["trust_remote_code"])
    model.to(device)
    preprocess = prompt_preprocessor(model, cfg.data)
    generation = {k: args[k] for k in ("max_new_tokens", "temperature", "top_k", "top_p", "seed")}
    if args["prompts"] is None:
        result = answer(model, preprocess, requests, device, stream_to=sys.stdout, **generation)[0]
        print(flush=True)
        speed = "n/a" if result["tokens_per_s"] is None else f"{result['tokens_per_s']:.1f}"
        print(f"time to first token: {result['ttft_s']:.3f} s, decode: {speed} tokens/s", file=sys.stderr)
        return [result]
    out = open(args["out"], "w") if args["out"] else sys.stdout
    results = []
    try:
        for i in range(0, len(requests), args["batch_size"]):
            for row in answer(model, preprocess, requests[i : i + args["batch_size"]], device, **generation):
                out.write(json.dumps(row) + "\n")
                results.append(row)
            out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"answered {len(results)} prompts", file=sys.stderr)
    return results


def main(argv: list[str] | None = None) -> None:
    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except UserError as err:  # one sentence, exit status 2 (a usage error), no traceback
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
