"""Rebuild a trained FusionModel from a run directory: its config.yaml plus final/trainable.safetensors."""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf
from safetensors.torch import load_file

from gemma_fusion.artifacts.export import load_export
from gemma_fusion.core.errors import UserError
from gemma_fusion.models.backbone import check_remote_code_consent
from gemma_fusion.models.build import build_model


def load_run(run_dir: str | Path, for_export: bool = False, trust_remote_code: bool = False):
    """-> (FusionModel with the run's trainable weights, the run's config).

    `for_export`: a plain eager model on a full-precision base, even if the run trained with `backbone.quant`,
    `model.compile` or `model.gradient_checkpointing` (export merges the adapters into full-precision weights,
    then quantises once). `trust_remote_code`: see `check_remote_code_consent`.
    """
    run_dir = Path(run_dir)
    config_path, weights = run_dir / "config.yaml", run_dir / "final" / "trainable.safetensors"
    for path in (config_path, weights):
        if not path.is_file():
            raise UserError(f"run={run_dir} has no {path.relative_to(run_dir)}; pass a directory written by train.py.")
    cfg = OmegaConf.load(config_path)
    check_remote_code_consent(cfg, f"run={run_dir}", trust_remote_code)
    if for_export:
        cfg.backbone.quant, cfg.model.compile, cfg.model.gradient_checkpointing = "none", False, False
    model = build_model(cfg)
    state = load_file(str(weights))
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(state) != expected:
        raise UserError(
            f"{weights} does not fit the model its config builds (missing {sorted(expected - set(state))[:3]}, "
            f"unexpected {sorted(set(state) - expected)[:3]}); was config.yaml edited?"
        )
    model.load_state_dict(state, strict=False)
    return model.eval(), cfg


def model_dir_kind(path: str | Path) -> str | None:
    """"export" (a `gemma_fusion.export` directory), "run" (a train.py run directory) or None."""
    path = Path(path).expanduser()
    if (path / "export.json").is_file():
        return "export"
    return "run" if (path / "config.yaml").is_file() else None


def load_for_inference(path: str | Path, trust_remote_code: bool = False):
    """A train.py run directory (config.yaml + final/) or an export (export.json) -> (FusionModel, its config)."""
    kind = model_dir_kind(path)
    if kind == "export":
        return load_export(Path(path).expanduser(), trust_remote_code)
    if kind == "run":  # load_run says what is missing if training has not finished
        return load_run(Path(path).expanduser(), trust_remote_code=trust_remote_code)
    raise UserError(f"run={path} is neither a train.py run directory (config.yaml and final/) nor an export "
                    "(export.json).")
