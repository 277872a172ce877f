"""LoRA adapters on the frozen backbone: injected (`add_lora`), saved in peft's own format, or merged into the
frozen weights.

`save_peft_adapter` writes what `PeftModel.save_pretrained` would have written for the backbone's full
transformers model, so `PeftModel.from_pretrained(base, dir)` loads it. peft names each tensor by its
module path inside that full model, without the adapter name:

    base_model.model.<decoder path>.layers.0.self_attn.q_proj.lora_A.weight
    base_model.model.<decoder path>.layers.0.self_attn.q_proj.lora_magnitude_vector   (DoRA)

where the decoder path is `model.language_model` in `Gemma4UnifiedForConditionalGeneration` and
whatever `get_decoder()` returns in any other causal LM (`model` for Llama).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file
from torch import nn

from gemma_fusion.core.errors import UserError
from gemma_fusion.models.backbone import meta_model, module_paths
from gemma_fusion.models.fusion import FusionModel

ADAPTER = "default"  # the adapter name add_lora injects under
GEMMA4_DECODER_PATH = "model.language_model"  # where load_backbone takes the decoder from


def add_lora(decoder: nn.Module, r: int, alpha: int, dropout: float, target_modules: list[str],
             use_dora: bool = False) -> None:
    """Inject peft LoRA adapters into the backbone's decoder (in place), in float32 whatever the backbone's dtype:
    peft creates them in the base layer's dtype, and bf16 adapters would lose small AdamW updates to rounding."""
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        use_dora=use_dora)
    try:
        inject_adapter_in_model(config, decoder)
    except ValueError as err:  # peft's NoMatchingPeftModuleError among others
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in decoder.named_modules() if isinstance(m, nn.Linear)})
        raise UserError(f"lora.target_modules={list(target_modules)} cannot be adapted ({err}); the backbone's "
                        f"linear layers are named {', '.join(linear)}.") from err
    for name, param in decoder.named_parameters():
        if "lora_" in name and param.is_floating_point():
            param.data = param.data.float()


def decoder_path(model: FusionModel) -> str:
    """Module path of the backbone's decoder inside the full transformers model a user would load."""
    if model.backbone.model_type == "gemma4_unified":
        return GEMMA4_DECODER_PATH
    return module_paths(meta_model(model.backbone.text_config))[0]  # the skeleton only: no memory, no weights


def _injected_config(decoder: nn.Module) -> LoraConfig:
    configs = getattr(decoder, "peft_config", {})
    if ADAPTER not in configs:
        raise ValueError("The model has no LoRA adapters to save (lora=none, or they were merged already).")
    return configs[ADAPTER]


def save_peft_adapter(model: FusionModel, out_dir: str | Path, backbone_path: str | Path | None = None,
                      lora_config: Mapping | None = None) -> Path:
    """Write `out_dir/adapter_config.json` + `out_dir/adapter_model.safetensors` (peft's format) and return out_dir.

    Args:
        model: a FusionModel whose decoder carries adapters injected by `trainable.add_lora`.
        out_dir: created if missing.
        backbone_path: recorded as `base_model_name_or_path`.
        lora_config: the `lora` config node (`r`, `alpha`, `dropout`, `target_modules`, `use_dora`); it must
            describe the adapters the model carries. None: taken from the injected adapters.
    Only the adapters are written: trained projectors stay in the run's trainable weights (`RunDir.trainable`).
    """
    injected = _injected_config(model.backbone.decoder)
    if lora_config is None:
        lora_config = dict(r=injected.r, alpha=injected.lora_alpha, dropout=injected.lora_dropout,
                           target_modules=injected.target_modules, use_dora=injected.use_dora)
    config = LoraConfig(
        r=int(lora_config["r"]), lora_alpha=lora_config["alpha"], lora_dropout=float(lora_config["dropout"]),
        target_modules=sorted(lora_config["target_modules"]), use_dora=bool(lora_config.get("use_dora", False)),
        base_model_name_or_path=None if backbone_path is None else str(backbone_path),
        task_type="CAUSAL_LM", inference_mode=True,
    )
    wanted = (config.r, config.lora_alpha, set(config.target_modules), config.use_dora)
    actual = (injected.r, injected.lora_alpha, set(injected.target_modules), injected.use_dora)
    if wanted != actual:
        raise ValueError(f"lora_config (r, alpha, target_modules, use_dora) = {wanted} does not describe the "
                         f"adapters the model carries {actual}; pass the config the model was built with.")
    path = decoder_path(model)
    prefix = f"base_model.model.{path}." if path else "base_model.model."
    tensors = get_peft_model_state_dict(model.backbone.decoder, adapter_name=ADAPTER)
    tensors = {prefix + key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir


def merge_lora(model: FusionModel) -> FusionModel:
    """Fold the adapters into the frozen base weights (peft's own merge) and remove the LoRA layers, in place."""
    decoder = model.backbone.decoder
    layers = [(name, module) for name, module in decoder.named_modules() if isinstance(module, BaseTunerLayer)]
    for name, layer in layers:
        layer.merge(safe_merge=True)  # raises on NaN / inf instead of corrupting the base weight
        parent, _, child = name.rpartition(".")
        setattr(decoder.get_submodule(parent), child, layer.get_base_layer())
    if hasattr(decoder, "peft_config"):
        del decoder.peft_config
    return model
