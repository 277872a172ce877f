"""`python -m gemma_fusion.infer` on a tiny trained run: streaming, speed report, batch mode, one-sentence errors."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from gemma_fusion.training import recipe
from gemma_fusion.core.errors import UserError
from gemma_fusion.artifacts.load import load_for_inference
from gemma_fusion.core.cli import parse
from gemma_fusion.infer import InferOptions
from gemma_fusion.inference.serve import read_requests
from gemma_fusion.inference.prompts import Request, TextStream, answer, build_batch, prompt_preprocessor
from tests.training.conftest import compose_train
from tests.training.test_export import plain_quantised_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_dir(tiny_gemma4_dir, demo_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    recipe.train(compose_train(tiny_gemma4_dir, demo_dir, "trainer.max_steps=2", "eval_after_train=false"), run)
    return run


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    pixels = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "noise.png")
    sf.write(folder / "tone.wav", 0.3 * np.sin(2 * np.pi * 440 * np.arange(8000) / 16000), 16000)
    return folder


def _infer(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run([sys.executable, "-m", "gemma_fusion.infer", *args], cwd=ROOT, capture_output=True,
                          timeout=180, env=env)
    proc.stdout, proc.stderr = proc.stdout.decode(), proc.stderr.decode()  # no newline translation: "\r" stays
    return proc


def test_infer_streams_text_and_batch_mode_writes_one_line_per_prompt(run_dir, media, tmp_path):
    image, audio = media / "noise.png", media / "tone.wav"
    single = _infer(f"run={run_dir}", f"image={image}", f"audio={audio}", "prompt=What is it?", "max_new_tokens=12")
    assert single.returncode == 0, single.stderr
    assert re.search(r"time to first token: \d+\.\d+ s, decode: \d+\.\d tokens/s", single.stderr), single.stderr
    assert single.stdout.endswith("\n")

    lines = [{"prompt": "What is it?", "image": str(image), "audio": os.path.relpath(audio, ROOT), "id": "both"},
             {"prompt": "Only text here"}, {"prompt": "Hear this", "audio": str(audio)}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "results.jsonl"
    batch = _infer(f"run={run_dir}", f"prompts={prompts}", f"out={out}", "max_new_tokens=12")
    assert batch.returncode == 0, batch.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["both", 1, 2] and [r["prompt"] for r in rows] == [x["prompt"] for x in lines]
    assert all(set(r) == {"id", "prompt", "output", "ttft_s", "tokens_per_s"} and r["ttft_s"] > 0 for r in rows)
    assert rows[0]["output"] == single.stdout[:-1]  # the same greedy text, alone or batched with shorter prompts


def test_text_streams_as_tokens_arrive(run_dir, media):
    model, cfg = load_for_inference(run_dir)
    preprocess = prompt_preprocessor(model, cfg.data)

    class Terminal(io.StringIO):
        def __init__(self):
            super().__init__()
            self.chunks, self.flushes = [], 0

        def write(self, text):
            self.chunks.append(text)
            return super().write(text)

        def flush(self):
            self.flushes += 1

    terminal = Terminal()
    request = Request("Describe", media / "noise.png", media / "tone.wav")
    result = answer(model, preprocess, [request], "cpu", stream_to=terminal, max_new_tokens=16, temperature=1.0,
                    seed=3)[0]
    assert "".join(terminal.chunks) == result["output"] and len(terminal.chunks) > 1
    assert terminal.flushes == len(terminal.chunks) and result["tokens_per_s"] > 0


def test_an_undecodable_image_names_its_prompt_and_file(run_dir, tmp_path):
    model, cfg = load_for_inference(run_dir)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    preprocess = prompt_preprocessor(model, cfg.data)
    with pytest.raises(UserError, match=r"prompt 4 \(image=.*broken.png\): Could not decode the image"):
        build_batch(model, preprocess, [Request("hi", broken, id=4)], "cpu")


def test_text_stream_never_splits_a_character(run_dir):
    model, _ = load_for_inference(run_dir)
    text = "héllo ✓ 𝄞 ok"
    stream = TextStream(model.tokenizer)
    pieces = [stream.push(t) for t in model.tokenizer(text, add_special_tokens=False)["input_ids"]]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # held back while a character was incomplete


def test_bad_key_and_missing_image_are_one_sentence_with_exit_status_2(run_dir, tmp_path):
    for args, needle in (([f"run={run_dir}", "prompt=hi", "temprature=1"], "unknown argument 'temprature=1'"),
                         ([f"run={run_dir}", "prompt=hi", f"image={tmp_path / 'nope.png'}"], "does not exist")):
        proc = _infer(*args)
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("argv, needle", [
    (["prompt=hi"], "run=PATH is required"),
    (["run=r", "prompt=hi", "top_p=2"], "top_p=2.0 is out of range"),
    (["run=r", "prompt=hi", "max_new_tokens=many"], "max_new_tokens=many is not a valid int"),
    (["run=r"], "either prompt=TEXT"),
    (["run=r", "prompt"], "unknown argument 'prompt'"),
])
def test_bad_arguments_are_user_errors(argv, needle):
    with pytest.raises(UserError, match=re.escape(needle)):
        parse(InferOptions, argv)


def test_unusable_inputs_are_user_errors(tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "ok"}\n["not", "an", "object"]\n')
    with pytest.raises(UserError, match="line 2 is not a JSON object"):
        read_requests(parse(InferOptions, ["run=r", f"prompts={bad}"]))
    with pytest.raises(UserError, match="neither a train.py run directory"):
        load_for_inference(tmp_path)


def test_an_int8_export_generates_what_the_merged_quantised_run_generates(run_dir, media, tmp_path):
    """`infer run=OUT` on a real export: the same tokens as the run's model with every decoder weight set, in plain
    nn.Linear layers, to the absmax int8 rounding of W + (B @ A) * alpha / r computed from the run's files."""
    from gemma_fusion.export import export_run
    from gemma_fusion.models.quant import QuantizedLinear

    out = export_run(run_dir, tmp_path / "int8", "int8")
    exported, cfg = load_for_inference(out)
    assert any(isinstance(m, QuantizedLinear) for m in exported.modules()) and cfg.backbone.path == str(out)
    reference = plain_quantised_model(run_dir, bits=8)
    assert not any(isinstance(m, QuantizedLinear) for m in reference.modules())
    request = Request(prompt="Read:", image=media / "noise.png", audio=media / "tone.wav")
    batch = build_batch(exported, prompt_preprocessor(exported, cfg.data), [request], "cpu")
    with torch.no_grad():  # the prompt's logits first: equal tokens alone would let a small weight error through
        logits = [m(**{**batch, "labels": None}).logits for m in (exported, reference)]  # every position's
    assert logits[0].shape[:2] == batch["input_ids"].shape
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-5)
    texts = [answer(m, prompt_preprocessor(m, cfg.data), [request], "cpu", max_new_tokens=8)[0]["output"]
             for m in (exported, reference)]
    assert texts[0] == texts[1] and texts[0]
    proc = _infer(f"run={out}", "prompt=Read:", f"image={media / 'noise.png'}", "max_new_tokens=4")
    assert proc.returncode == 0, proc.stderr
