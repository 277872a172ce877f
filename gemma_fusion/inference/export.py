"""Export a trained run as one self-contained directory for inference:

    python -m gemma_fusion.export run=RUN quant=none|int8|int4 out=OUT [dtype=bfloat16|float32] [group_size=64]
        [overwrite=false]

Steps: rebuild the run's model on a full-precision base (even if it trained on a quantised one), merge the
LoRA adapters into the base weights (peft's merge), cast the backbone to `dtype` (default: the run's
`backbone.dtype`), quantise the decoder's Linear layers once (`quant`,
the same weight-only int8 / int4 as `backbone.quant`, gemma_fusion/models/quant.py), and write OUT:

  config.json, model.safetensors   the backbone as transformers names it (the whole Gemma 4 unified model, or
                                   the causal LM), in `dtype`. With quant=none it is a plain
                                   transformers checkpoint; for Gemma 4 unified with the native projectors
                                   (`patch_ef`, `audio_frames`) it also holds the trained embedders, so
                                   `Gemma4UnifiedForConditionalGeneration.from_pretrained(OUT)` is the trained
                                   model. With int8 / int4 each quantised Linear `P` is stored as `P.qweight`
                                   (int8, or uint8 holding two int4) + `P.scale` (+ `P.bias`) instead of
                                   `P.weight`; `load_export` rebuilds it without ever allocating `P.weight`.
  projectors.safetensors           the trained projectors in float32 (the vision position table and every norm
                                   included; never quantised)
  tokenizer files                  the backbone's tokenizer
  export.json                      format, quant, which layers are quantised, the run's config (projector
                                   designs, attention settings, preprocessing: data.image_tokens,
                                   data.audio_max_seconds) with backbone.path = OUT
  any of the backbone directory's generation / processor / chat-template files, copied

The directory is built next to OUT and renamed into place at the end: a failed export leaves no partial OUT.
`load_export(OUT)` (and `FusionModel.from_pretrained(OUT)`, `python -m gemma_fusion.infer run=OUT`) loads it.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import nn

from gemma_fusion.core.errors import UserError
from gemma_fusion.core.files import staged_directory
from gemma_fusion.models.backbone import DTYPES, meta_model, module_paths, read_backbone_spec, remote_code_options

from gemma_fusion.artifacts.export import FORMAT, GEMMA4_EMBEDDERS, check_loaded
from gemma_fusion.artifacts.rundir import ExportDir
from gemma_fusion.models.quant import QuantizedLinear, quantize_frozen
from gemma_fusion.models.lora import merge_lora
from gemma_fusion.artifacts.load import load_run
from gemma_fusion.models.backbone import full_model_class
log = logging.getLogger(__name__)
QUANTS = ("none", "int8", "int4")
COPIED_FILES = ("generation_config.json", "preprocessor_config.json", "processor_config.json",
                "chat_template.jinja", "chat_template.json", "pretrain.json")


def export_run(run_dir: str | Path, out_dir: str | Path, quant: str = "none", group_size: int = 64,
               overwrite: bool = False, dtype: str | None = None, trust_remote_code: bool = False) -> Path:
    """Write the export directory (see the module docstring) and return its path."""
    if quant not in QUANTS:
        raise UserError(f"export: quant={quant} is not one of {', '.join(QUANTS)}.")
    out_dir = Path(out_dir).expanduser().absolute()
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"export: out={out_dir} exists and is not empty; pass another out= or overwrite=true.")
    model, cfg = load_run(run_dir, for_export=True, trust_remote_code=trust_remote_code)
    backbone_dir = Path(cfg.backbone.path).expanduser()
    merged = bool(getattr(model.backbone.decoder, "peft_config", None))
    if merged:
        merge_lora(model)
    if dtype is not None:
        if dtype not in DTYPES:
            raise UserError(f"export: dtype={dtype} is not one of {', '.join(sorted(DTYPES))}.")
        model.backbone.to(DTYPES[dtype])  # the projectors keep float32 (projectors.safetensors)
    decoder = model.backbone.decoder
    if quant != "none":
        quantize_frozen(decoder, quant, group_size)
    config = read_backbone_spec(backbone_dir, **remote_code_options(cfg.backbone)).config
    full = meta_model(config)
    decoder_prefix, head_prefix = (p + "." for p in module_paths(full))
    dtype_of = model.backbone.dtype

    tensors: dict[str, torch.Tensor] = {}
    quantized: dict[str, dict] = {}
    for name, module in decoder.named_modules():
        if isinstance(module, QuantizedLinear):
            quantized[decoder_prefix + name] = {"in_features": module.in_features, "bits": module.bits,
                                                "group_size": module.group_size}
            tensors.update({f"{decoder_prefix}{name}.{k}": v for k, v in module.stored().items()})
    tensors.update({decoder_prefix + k: v for k, v in decoder.state_dict().items()})
    if not config.get_text_config().tie_word_embeddings:
        tensors.update({head_prefix + k: v for k, v in model.backbone.lm_head.state_dict().items()})
    native = {}
    if model.backbone.model_type == "gemma4_unified":
        native = gemma4_embedders(model, full, backbone_dir, tensors)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    if quant == "none":  # transformers writes its own on-disk names (they differ from the module names)
        full.load_state_dict(tensors, strict=False, assign=True)
        full.tie_weights()
        check_loaded(full, quantized, "the run's model")
    projectors = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()
                  if k.startswith(("vision.", "audio."))}

    run_cfg = OmegaConf.to_container(cfg, resolve=True)
    run_cfg["backbone"].update(path=str(out_dir), quant=quant, quant_group_size=group_size, quant_backend="native",
                               dtype=str(dtype_of).removeprefix("torch."))
    run_cfg["model"]["init_from"] = None
    for part in ("vision", "audio"):
        if isinstance(run_cfg["model"].get(part), dict):
            run_cfg["model"][part]["init_from_checkpoint"] = False  # the trained weights come from projectors.safetensors
    meta = {"format": FORMAT, "run": str(Path(run_dir).absolute()), "quant": quant, "lora_merged": merged,
            "dtype": str(dtype_of).removeprefix("torch."), "model_type": model.backbone.model_type,
            "transformers_compatible": transformers_compatible(model, quant, native),
            "native_projectors": native, "quantized": quantized, "config": run_cfg}

    with staged_directory(out_dir) as tmp:  # a failed export leaves no partial OUT
        staged = ExportDir(tmp)
        if quant == "none":
            full.save_pretrained(tmp)
        else:  # the module names; load_export rebuilds the quantised layers from them
            config.save_pretrained(tmp)
            save_file(tensors, str(staged.model), metadata={"format": "pt"})
        save_file(projectors, str(staged.projectors), metadata={"format": "pt"})
        model.tokenizer.save_pretrained(tmp)
        for name in COPIED_FILES:
            if (backbone_dir / name).is_file():
                shutil.copy2(backbone_dir / name, tmp / name)
        staged.write_meta(meta)
    log.info("exported %s -> %s (quant=%s, LoRA merged: %s)", run_dir, out_dir, quant, merged)
    return out_dir


def transformers_compatible(model, quant: str, native: dict[str, bool]) -> bool:
    """Whether transformers' own class on OUT is the trained model: unquantised, Gemma 4's native projectors (or
    a text-only causal LM without projectors) and its attention rules (audio is causal in transformers)."""
    if quant != "none":
        return False
    if model.backbone.model_type != "gemma4_unified":
        return model.vision is None and model.audio is None
    same = all(native[part] for part in native if getattr(model, part) is not None)
    if model.audio is not None and model.bidirectional_audio:
        log.warning("export: this run attends bidirectionally inside audio clips (model.bidirectional_audio=true); "
                    "transformers' Gemma 4 attends causally there, so load the export with "
                    "gemma_fusion.export.load_export / python -m gemma_fusion.infer to get the trained behaviour.")
        return False
    return same


def gemma4_embedders(model, full: nn.Module, backbone_dir: Path, tensors: dict) -> dict[str, bool]:
    """Fill `model.embed_vision.*` / `model.embed_audio.*` of a Gemma 4 unified export: the trained projector
    where it is the native design with the checkpoint's shapes, else the base checkpoint's own embedder (read by
    loading the base model once: only for runs with other designs). Returns {part: True where the trained
    projector went in}."""
    native, base = {}, None
    for part, prefix in GEMMA4_EMBEDDERS.items():
        projector = getattr(model, part)
        state = {} if projector is None else projector.state_dict()
        slot = full.get_submodule(prefix.rstrip("."))  # the checkpoint's own embedder, on the meta device
        native[part] = (projector is not None and projector.gemma4_native  # the projector contract says so
                        and {k: v.shape for k, v in slot.state_dict().items()} == {k: v.shape for k, v in state.items()})
        if not native[part]:
            base = base if base is not None else base_embedders(backbone_dir, model.backbone.dtype)
            state = base.get(part, {})
        tensors.update({prefix + k: v.to(model.backbone.dtype) for k, v in state.items()})
    return native


def base_embedders(backbone_dir: Path, dtype: torch.dtype) -> dict[str, dict]:
    base = full_model_class("gemma4_unified").from_pretrained(backbone_dir, dtype=dtype, use_safetensors=True,
                                                              trust_remote_code=False)
    return {part: getattr(base.model, f"embed_{part}").state_dict() for part in GEMMA4_EMBEDDERS
            if getattr(base.model, f"embed_{part}") is not None}

