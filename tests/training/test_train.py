"""train.py and eval.py end to end on a tiny backbone: files written, what trains, what stays frozen."""
from __future__ import annotations

import csv
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from gemma_fusion.eval import recipe as eval_recipe
from gemma_fusion.training import recipe
from gemma_fusion.core.errors import UserError
from gemma_fusion.models.build import build_model


def test_train_then_eval_writes_the_run_directory(make_cfg, tmp_path, start_weights):
    cfg = make_cfg("trainer.max_steps=4", "eval_after_train=false")
    trained = recipe.train(cfg, tmp_path)
    before = start_weights.weights  # this run's own weights when fitting started

    assert (tmp_path / "config.yaml").is_file()
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    losses = [r for r in rows if r.get("train/loss")]
    assert "step" in rows[0] and len(losses) >= 3
    assert {"train/tokens_per_s", "train/samples_per_s", "lr/vision", "lr/audio", "lr/lora", "train/grad_norm",
            "train/model_tflops_per_s", "train/peak_mem_gb", "data/skipped"} <= set(rows[0])
    assert all(float(r["train/model_tflops_per_s"]) > 0 for r in rows if r.get("train/model_tflops_per_s"))
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]  # one row per step, the step's metrics all in it:
    assert all(r["train/loss"] and r["train/grad_norm"] and r["lr/lora"] and r["data/samples_ok"] for r in rows)

    saved = load_file(tmp_path / "final" / "trainable.safetensors")
    model = build_model(cfg)
    assert set(saved) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(k.startswith("vision.") for k in saved) and any("lora_" in k for k in saved)
    assert not any(k.startswith("backbone.") and "lora_" not in k for k in saved)
    compute = json.loads((tmp_path / "compute.json").read_text())
    counts = compute["parameters"]
    assert counts["vision"]["trainable"] == sum(p.numel() for n, p in model.named_parameters() if n.startswith("vision."))
    assert counts["backbone"]["trainable"] == 0 and counts["backbone"]["frozen"] > 0 and counts["lora"]["trainable"] > 0
    flops = compute["forward_flops_per_sample"]
    assert flops["vision"] > 0 and flops["audio"] > 0 and flops["backbone"] > 10 * flops["vision"]
    assert flops["total"] == pytest.approx(flops["vision"] + flops["audio"] + flops["backbone"])
    assert compute["tokens"]["per_image"] <= 8 and compute["tokens"]["per_audio_second"] == 16000 / model.audio.frame_dim
    assert compute["designs"]["vision"].endswith("PatchEmbedder")
    measured = compute["samples_measured"]  # val is sorted by task: reading goes on until both modalities are seen
    assert measured["with_image"] > 0 and measured["with_audio"] > 0
    units = compute["forward_flops_per_unit"]
    assert units["vision_per_image"] > 0 and units["audio_per_second"] > 0 and units["backbone_per_token"] > 0
    adapter = tmp_path / "final" / "adapter"  # the adapters again, in peft's format (round trip: test_adapters.py)
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()

    # training moved what trains and nothing of the frozen backbone
    assert before.keys() == dict(trained.named_parameters()).keys()
    assert all(not before[n].any() for n in before if "lora_B" in n)  # the true start: peft's B is zero at init
    for name, p in trained.named_parameters():
        assert torch.equal(p, before[name]) != p.requires_grad, name

    result = recipe.run(make_cfg("trainer.max_steps=4"), tmp_path)

    assert set(result) == {"overall", "tasks", "modalities", "data"} and set(result["modalities"]) == {"image", "audio"}
    assert set(result["tasks"]) == {"ocr_digits", "ocr_words", "dtmf"}
    assert set(result["overall"]) == {"loss", "exact_match", "cer", "wer", "n"} and result["overall"]["n"] == 6

    again = eval_recipe.run(eval_entry_cfg(tmp_path))
    assert json.loads((tmp_path / "eval.json").read_text()) == again
    assert again["overall"]["loss"] == pytest.approx(result["overall"]["loss"], rel=1e-5)


def eval_entry_cfg(run_dir):
    from hydra import compose, initialize_config_dir

    from gemma_fusion.core.config import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("eval", overrides=[f"run={run_dir}"])


def test_frozen_backbone_gets_no_gradient_and_projectors_do(make_cfg):
    model = build_model(make_cfg())
    model.train()
    assert all(not m.training for n, m in model.backbone.named_modules() if "lora_dropout" not in n)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("vision.", "audio.")) or "lora_" in n for n in trainable)


def test_backbone_path_that_does_not_exist_is_one_clear_sentence(make_cfg, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_model(make_cfg(f"backbone.path={tmp_path / 'nope'}"))


def test_backbone_that_is_not_a_causal_lm_is_rejected(make_cfg, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="not a decoder-only causal LM"):
        build_model(make_cfg(f"backbone.path={tmp_path}"))


def test_projector_width_mismatch_names_both_widths(make_cfg):
    with pytest.raises(UserError, match="vision projector outputs width 32 but the backbone's hidden size is 64"):
        build_model(make_cfg("+model.vision.out_dim=32"))


def test_a_resumed_run_continues_the_same_wandb_run(make_cfg, tmp_path):
    from gemma_fusion.training.callbacks import build_loggers

    cfg = make_cfg("logger=wandb")
    first = [lg for lg in build_loggers(cfg, tmp_path) if type(lg).__name__ == "WandbLogger"][0]
    again = [lg for lg in build_loggers(cfg, tmp_path) if type(lg).__name__ == "WandbLogger"][0]
    other = [lg for lg in build_loggers(cfg, tmp_path / "other") if type(lg).__name__ == "WandbLogger"][0]
    assert first._id == again._id == (tmp_path / "wandb_run_id").read_text() != other._id
    assert os.environ.get("WANDB_MODE") in ("offline", "online")


def test_adapters_and_projectors_train_in_float32_on_a_bf16_backbone(make_cfg):
    model = build_model(make_cfg("backbone.dtype=bfloat16"))
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and set(trainable.values()) == {torch.float32}
    assert {p.dtype for p in model.backbone.decoder.layers[0].self_attn.q_proj.base_layer.parameters()} == {torch.bfloat16}


def test_a_projector_part_listed_in_frozen_modules_stays_frozen(make_cfg):
    from gemma_fusion.models.trainable import set_trainable

    model = build_model(make_cfg())
    model.vision.frozen_modules = lambda: [model.vision.patch_dense]
    counts = set_trainable(model)
    assert not model.vision.patch_dense.weight.requires_grad and model.vision.patch_ln1.weight.requires_grad
    frozen = sum(p.numel() for p in model.vision.patch_dense.parameters())
    assert counts["vision"]["total"] - counts["vision"]["trainable"] == frozen


@pytest.mark.parametrize("mode", ["flops", "tokens"])
def test_compute_matched_runs_spend_the_budget(make_cfg, tmp_path, mode):
    """compute.match: designs of different cost get the steps that spend the same budget."""
    import yaml

    from gemma_fusion.core.schema import DataConfig
    from gemma_fusion.data.pipeline import make_loader, preprocessor_for
    from gemma_fusion.training.compute import compute_report

    steps = {}
    for design in ("patch_ef", "vit"):
        # audio_frames: the audio samples' FLOPs small beside the vision designs' difference (sinc_fbank's DFT is not)
        cfg = make_cfg(f"model/vision={design}", "model/audio=audio_frames", "eval_after_train=false")
        model = build_model(cfg)
        val = make_loader(DataConfig(eval_batch_size=4), preprocessor_for(model, 8), train=False, spec=cfg.data.val)
        report = compute_report(model, val, {})
        per_sample = 3 * report["forward_flops_per_sample"]["total"] if mode == "flops" else report["tokens"]["per_sample"]
        budget = 3.4 * per_sample * cfg.data.batch_size  # 3.4 steps' worth for patch_ef
        if design == "patch_ef":
            patch_ef_budget = budget
        run_dir = tmp_path / design
        recipe.train(make_cfg(f"model/vision={design}", "model/audio=audio_frames", "eval_after_train=false",
                              f"compute.match={mode}", f"compute.budget={patch_ef_budget}"), run_dir)
        matched = json.loads((run_dir / "compute.json").read_text())["matched"]
        assert matched["max_steps"] == round(patch_ef_budget / (matched["per_sample"] * cfg.data.batch_size))
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["max_steps"] == matched["max_steps"]
        rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
        assert len({r["step"] for r in rows if r.get("train/loss")}) == matched["max_steps"]
        steps[design] = matched["max_steps"]
    assert steps["patch_ef"] == 3
    if mode == "flops":  # the ViT costs more per sample: fewer steps for the same FLOPs
        assert steps["vit"] < steps["patch_ef"]


def test_compute_match_without_a_budget_is_one_sentence(make_cfg, tmp_path):
    with pytest.raises(UserError, match="compute.budget"):
        recipe.train(make_cfg("compute.match=flops"), tmp_path)


def test_a_value_the_chosen_options_leave_open_is_one_sentence(make_cfg, tmp_path):
    with pytest.raises(UserError, match=r"data.train, data.val must be set"):
        recipe.train(make_cfg("data=shards", "data.train=???", "data.val=???"), tmp_path)
