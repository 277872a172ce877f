"""`python -m gemma_fusion.export`: LoRA merged, weights quantised once, a directory transformers and we load."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import Gemma4UnifiedForConditionalGeneration

from gemma_fusion.training import recipe
from gemma_fusion import FusionModel
from gemma_fusion.core.errors import UserError
from gemma_fusion.export import export_run, load_export
from gemma_fusion.models.quant import QuantizedLinear
from gemma_fusion.models.lora import merge_lora
from gemma_fusion.artifacts.load import load_run
from tests.models.test_parity import _batch
from tests.training.conftest import compose_train

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained_run(tiny_gemma4_dir, tiny_demo_dir, tmp_path_factory) -> Path:
    """A run whose adapters moved (LoRA B is zero at init): 3 steps at a high learning rate, Gemma 4's own
    projectors (patch_ef, audio_frames: the demo's audio design is sinc_fbank) and causal audio as transformers'
    Gemma 4 has it (so the export is transformers-compatible)."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose_train(tiny_gemma4_dir, tiny_demo_dir, "eval_after_train=false", "model.bidirectional_audio=false",
                        "model/audio=audio_frames",
                        "optim.lr.lora=0.01", "trainer.max_steps=3")
    recipe.train(cfg, run_dir)
    return run_dir


def _logits(model: FusionModel, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**{**batch, "labels": None}).logits


def test_quant_none_loads_in_transformers_with_our_logits_and_keeps_the_trained_model(trained_run, tmp_path):
    out = export_run(trained_run, tmp_path / "out", "none")
    meta = json.loads((out / "export.json").read_text())
    assert meta["transformers_compatible"] and meta["lora_merged"] and meta["native_projectors"] == {
        "vision": True, "audio": True}
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not any("lora_" in k for k in f.keys())  # merged, not carried

    ours = FusionModel.from_pretrained(out).eval()
    theirs = Gemma4UnifiedForConditionalGeneration.from_pretrained(out).eval()
    batch = _batch(ours)
    with torch.no_grad():
        ref = theirs(**{**batch, "labels": None}).logits
    torch.testing.assert_close(_logits(ours, batch), ref, atol=1e-4, rtol=1e-4)

    trained, _ = load_run(trained_run)  # adapters unmerged, as training left them
    exported, cfg = load_export(out)
    assert cfg.backbone.path == str(out) and cfg.data.image_tokens == 8
    expected = _logits(trained, batch)
    torch.testing.assert_close(_logits(exported, batch), expected, atol=1e-4, rtol=1e-4)
    base = FusionModel.from_pretrained(yaml.safe_load((trained_run / "config.yaml").read_text())["backbone"]["path"])
    assert (_logits(base.eval(), batch) - expected).abs().max() > 1e-3  # training moved the model: the test can fail


def test_a_design_gemma4_lacks_exports_for_gemma_fusion_and_says_transformers_cannot_load_it(
        tiny_gemma4_dir, tiny_demo_dir, tmp_path):
    """The demo's sinc_fbank is not Gemma 4's embed_audio: the export keeps it in projectors.safetensors, records
    that transformers' class is not the trained model, and our loader gives the run's own logits."""
    run_dir = tmp_path / "run"
    recipe.train(compose_train(tiny_gemma4_dir, tiny_demo_dir, "eval_after_train=false", "model/audio=sinc_fbank",
                               "optim.lr.lora=0.01", "trainer.max_steps=3"), run_dir)
    out = export_run(run_dir, tmp_path / "out", "none")
    meta = json.loads((out / "export.json").read_text())
    assert meta["native_projectors"] == {"vision": True, "audio": False} and not meta["transformers_compatible"]
    trained, _ = load_run(run_dir)
    exported, _ = load_export(out)
    batch = _batch(trained)
    torch.testing.assert_close(_logits(exported, batch), _logits(trained, batch), atol=1e-4, rtol=1e-4)


DECODER_LINEAR = re.compile(r"^model\.language_model\.(layers\.\d+\.(?:self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj))"
                            r"\.weight$")


def merged_weights_from_files(run_dir: Path) -> dict[str, torch.Tensor]:
    """{decoder Linear path: W + (B @ A) * alpha / r}, read from the backbone's checkpoint file and the run's
    trained adapters, with nothing of gemma_fusion or peft in between (float32)."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    scaling = cfg["lora"]["alpha"] / cfg["lora"]["r"]
    trained = load_file(run_dir / "final" / "trainable.safetensors")
    merged = {}
    with safe_open(str(Path(cfg["backbone"]["path"]) / "model.safetensors"), "pt") as f:
        for key in f.keys():
            if match := DECODER_LINEAR.match(key):
                a, b = (f"backbone.decoder.{match[1]}.lora_{x}.default.weight" for x in "AB")
                weight = f.get_tensor(key).float()
                merged[match[1]] = weight + (trained[b] @ trained[a]) * scaling if a in trained else weight
    assert any("lora_A" in k for k in trained)
    return merged


def absmax_quantise(weight: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest, the plain formula: per output row (int8, step max|w| / 127) or per `group`
    inputs of a row, the row zero-padded to whole groups (int4, step max|w| / 7). -> (integers [out, in or padded],
    steps [out, 1 or groups])."""
    if bits == 8:
        step = weight.abs().amax(dim=1, keepdim=True) / 127
        return torch.round(weight / step).clamp(-127, 127), step
    groups = torch.nn.functional.pad(weight, (0, -weight.shape[1] % group)).view(weight.shape[0], -1, group)
    step = groups.abs().amax(dim=2, keepdim=True) / 7
    return torch.round(groups / step).clamp(-8, 7).flatten(1), step.squeeze(-1)


def dequantised(weight: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """`weight` after absmax quantisation, back in float32 [out, in]."""
    q, step = absmax_quantise(weight, bits, group)
    if bits == 8:
        return q * step
    return (q.view(q.shape[0], -1, group) * step[..., None]).flatten(1)[:, : weight.shape[1]]


def plain_quantised_model(run_dir: Path, bits: int, group: int = 64) -> FusionModel:
    """The run's model (projectors included) with every decoder Linear set to its merged, absmax-quantised weight
    computed from the files (`merged_weights_from_files`), kept as a plain nn.Linear."""
    model, _ = load_run(run_dir, for_export=True)
    merge_lora(model)  # peft's own merge removes the LoRA layers; their weights are overwritten just below
    merged = merged_weights_from_files(run_dir)
    decoder = model.backbone.decoder
    with torch.no_grad():
        for path, weight in merged.items():
            decoder.get_submodule(path).weight.copy_(dequantised(weight, bits, group))
    return model.eval()


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantised_export_is_the_merged_model_quantised_once(trained_run, tmp_path, quant):
    """Against the plain formula: the stored integers and scales are the absmax quantisation of W + (B @ A) * alpha
    / r computed from the checkpoint and adapter files, and the export's logits are those of that weight."""
    bits, group = (8, 64) if quant == "int8" else (4, 64)  # export_run's default group_size
    out = export_run(trained_run, tmp_path / quant, quant)
    meta = json.loads((out / "export.json").read_text())
    assert not meta["transformers_compatible"] and meta["quantized"]
    merged = merged_weights_from_files(trained_run)
    assert set(meta["quantized"]) == {f"model.language_model.{path}" for path in merged}  # every decoder Linear
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for path, weight in merged.items():  # stored as int8 / packed int4, never as a full-precision weight
            name = f"model.language_model.{path}"
            assert f"{name}.weight" not in keys
            stored, scale = f.get_tensor(f"{name}.qweight"), f.get_tensor(f"{name}.scale")
            if bits == 4:  # two values a byte, the even index in the low nibble, stored + 8
                assert stored.dtype == torch.uint8
                stored = torch.stack(((stored & 0xF).to(torch.int16) - 8, (stored >> 4).to(torch.int16) - 8), -1)
            q, step = absmax_quantise(weight, bits, group)
            assert torch.equal(stored.flatten(1).float(), q), name
            torch.testing.assert_close(scale.float().view_as(step), step, rtol=1e-6, atol=0)

    exported, _ = load_export(out)
    layers = [m for m in exported.backbone.decoder.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == len(merged) and {m.bits for m in layers} == {bits}
    assert exported.vision.pos_embedding.dtype == torch.float32  # the position table stays full precision
    batch = _batch(exported)
    expected = _logits(plain_quantised_model(trained_run, bits, group), batch)
    torch.testing.assert_close(_logits(exported, batch), expected, atol=1e-5, rtol=1e-5)
    unquantised, _ = load_run(trained_run, for_export=True)
    assert (_logits(merge_lora(unquantised).eval(), batch) - expected).abs().max() > 1e-4  # rounding shows
    with pytest.raises(UserError, match="load_export"):
        FusionModel.from_pretrained(out)


def test_a_failed_export_leaves_no_directory_and_a_full_one_is_not_overwritten(trained_run, tmp_path, monkeypatch):
    import gemma_fusion.inference.export as export

    from safetensors import SafetensorError

    def disk_full(*args, **kwargs):  # what safetensors' writer raises on a full disk
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(export, "save_file", disk_full)
    with pytest.raises(UserError, match=r"Could not write .*out \(No space left on device\); nothing was written"):
        export_run(trained_run, tmp_path / "out", "int8")
    assert list(tmp_path.iterdir()) == []  # neither OUT nor the temporary directory
    monkeypatch.undo()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="overwrite=true"):
        export_run(trained_run, tmp_path / "out", "int8")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_cli_exports_and_rejects_bad_arguments_in_one_sentence(trained_run, tmp_path):
    ok = subprocess.run([sys.executable, "-m", "gemma_fusion.export", f"run={trained_run}", "quant=int4",
                         f"out={tmp_path / 'cli'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "exported" in ok.stdout and (tmp_path / "cli" / "export.json").is_file()
    bad = subprocess.run([sys.executable, "-m", "gemma_fusion.export", f"run={trained_run}", "quant=int3",
                          f"out={tmp_path / 'bad'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "quant=int3 is not one of none, int8, int4" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "bad").exists()
