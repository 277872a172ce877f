"""Answer prompts given as files: build the batch as the run's loader would, generate, stream and time it."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

import torch

from gemma_fusion.core.batch import model_inputs
from gemma_fusion.data.collate import collate
from gemma_fusion.data.pipeline import AUDIO_EXTS, IMAGE_EXTS, SamplePreprocessor, run_preprocessor
from gemma_fusion.core.errors import BadSample, UserError
from gemma_fusion.inference.generate import stream_generate
from gemma_fusion.models.fusion import FusionModel


@dataclass
class Request:
    """One prompt, with an optional image and audio file; `id` names it in results and errors."""

    prompt: str
    image: Path | None = None
    audio: Path | None = None
    id: object = None


def prompt_preprocessor(model: FusionModel, data) -> SamplePreprocessor:
    """The run's own per-sample preprocessing (its `data` settings), target-free."""
    preprocess = run_preprocessor(model, data, skip_long=False)
    return replace(preprocess, require_target=False)


def build_batch(model: FusionModel, preprocess: SamplePreprocessor, requests: list[Request], device) -> dict:
    """Each request becomes a shard-style sample (`json` + `image.0.<ext>` / `audio.0.<ext>` bytes) that the
    run's `SamplePreprocessor` turns into tokens, patches and frames; collated right-padded, moved to `device`."""
    samples = []
    for req in requests:
        raw = {"__key__": str(req.id), "__url__": "the prompt", "json": json.dumps({"prompt": req.prompt}).encode()}
        for kind, path, exts in (("image", req.image, IMAGE_EXTS), ("audio", req.audio, AUDIO_EXTS)):
            if path is not None:
                ext = path.suffix.lower().lstrip(".")
                if ext not in exts:
                    raise UserError(f"{kind}={path} has extension '.{ext}'; use one of {', '.join(exts)}.")
                raw[f"{kind}.0.{ext}"] = path.read_bytes()
        try:
            samples.append(preprocess(raw))
        except BadSample as err:  # the decoders do not know the file's name: say which prompt and files
            files = " ".join(f"{k}={p}" for k, p in (("image", req.image), ("audio", req.audio)) if p is not None)
            name = "the prompt" if req.id is None else f"prompt {req.id}"
            raise UserError(f"{name} ({files or 'text only'}): {err}") from err
    batch = collate(samples, model.tokens.pad)
    return {k: v.to(device) for k, v in model_inputs(batch).items()}


class TextStream:
    """Incremental detokenisation: text is released once its characters are complete (never half a UTF-8
    character), decoding only the last few tokens each time."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids = tokenizer, []
        self.prefix = self.read = 0  # ids[prefix:read] were decoded last time as context; ids[read:] are new

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._release(final=False)

    def finish(self) -> str:
        """What is still held back (bytes that never completed a character come out as U+FFFD)."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""  # nothing new, or an incomplete multi-byte character: wait for its next bytes
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]

    def text(self) -> str:
        return self._decode(self.ids)


@torch.no_grad()
def answer(model: FusionModel, preprocess: SamplePreprocessor, requests: list[Request], device,
           stream_to: TextIO | None = None, **generation) -> list[dict]:
    """Generate for a batch of requests -> one result dict each: id, prompt, output, ttft_s (from reading the
    media to the first token), tokens_per_s (tokens after the first over the time after it; None below 2).

    `stream_to`: row 0's text is written (and flushed) there as it arrives. `generation`: `stream_generate`'s
    max_new_tokens, temperature, top_k, top_p, seed.
    """
    start = time.perf_counter()
    batch = build_batch(model, preprocess, requests, device)
    texts = [TextStream(model.tokenizer) for _ in requests]
    first, last, counts = None, [None] * len(requests), [0] * len(requests)
    for next_ids, new in stream_generate(model, batch, **generation):
        tokens, new = next_ids.tolist(), new.tolist()  # (waits for the device: the step is done)
        now = time.perf_counter()
        first = first or now
        for i in (i for i, is_new in enumerate(new) if is_new):
            piece = texts[i].push(tokens[i])
            last[i], counts[i] = now, counts[i] + 1
            if stream_to is not None and i == 0:
                _write(stream_to, piece)
    if stream_to is not None:
        _write(stream_to, texts[0].finish())
    return [{"id": req.id, "prompt": req.prompt, "output": text.text(), "ttft_s": round(first - start, 4),
             "tokens_per_s": round((n - 1) / (t - first), 2) if n > 1 and t > first else None}
            for req, text, n, t in zip(requests, texts, counts, last)]


def _write(stream: TextIO, text: str) -> None:
    if text:
        stream.write(text)
        stream.flush()
