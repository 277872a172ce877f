"""What `python -m gemma_fusion.infer` does once its options are parsed: read the prompts (their files are
checked before any model loads), load the run or export on a device, answer one prompt streaming to stdout,
or a JSONL file of prompts in batches, one JSON line per answer.

`opts` below is the command's options (`gemma_fusion.infer.InferOptions`): run, prompt, image, audio,
prompts, out, the generation settings, device, batch_size and trust_remote_code.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from gemma_fusion.artifacts.load import load_for_inference
from gemma_fusion.core.errors import UserError
from gemma_fusion.inference.prompts import Request, answer, prompt_preprocessor

GENERATION = ("max_new_tokens", "temperature", "top_k", "top_p", "seed")  # options handed on to `answer`


def read_requests(opts) -> list[Request]:
    """The prompts to answer (`opts.prompt` with its image / audio, or each line of `opts.prompts`), with
    their media paths checked; a UserError names the line or file that is wrong."""
    if opts.prompts is None:
        lines, where = [{"prompt": opts.prompt, "image": opts.image, "audio": opts.audio}], None
    else:
        where = Path(opts.prompts)
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


def pick_device(name: str) -> torch.device:
    """`auto` (cuda when there is one), `cpu`, `cuda` or `cuda:N` -> a usable device, else a UserError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device={name} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={device} was asked for but no CUDA device is available; use device=cpu.")
    return device


def serve(opts) -> list[dict]:
    """Answer `opts`' prompts; returns one result dict per prompt ({"id", "prompt", "output", "ttft_s",
    "tokens_per_s"}). One prompt streams its text to stdout and its speed to stderr; a prompts file
    writes one JSON line per prompt to `opts.out` (stdout when None)."""
    requests = read_requests(opts)
    device = pick_device(opts.device)
    model, cfg = load_for_inference(opts.run, opts.trust_remote_code)
    model.to(device)
    preprocess = prompt_preprocessor(model, cfg.data)
    generation = {k: getattr(opts, k) for k in GENERATION}
    if opts.prompts is None:
        result = answer(model, preprocess, requests, device, stream_to=sys.stdout, **generation)[0]
        print(flush=True)
        speed = "n/a" if result["tokens_per_s"] is None else f"{result['tokens_per_s']:.1f}"
        print(f"time to first token: {result['ttft_s']:.3f} s, decode: {speed} tokens/s", file=sys.stderr)
        return [result]
    out = open(opts.out, "w") if opts.out else sys.stdout
    results = []
    try:
        for i in range(0, len(requests), opts.batch_size):
            for row in answer(model, preprocess, requests[i : i + opts.batch_size], device, **generation):
                out.write(json.dumps(row) + "\n")
                results.append(row)
            out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"answered {len(results)} prompts", file=sys.stderr)
    return results
