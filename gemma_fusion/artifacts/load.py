"""Rebuild a trained FusionModel from a run directory (its config plus its final trainable weights, see
`artifacts/rundir.py`) or an export; start a training stage from an earlier run's weights."""
from __future__ import annotations

import logging
from pathlib import Path

from safetensors.torch import load_file

from gemma_fusion.artifacts.export import load_export
from gemma_fusion.artifacts.rundir import ExportDir, RunDir
from gemma_fusion.core.config import check_targets
from gemma_fusion.core.errors import UserError
from gemma_fusion.models.backbone import check_remote_code_consent
from gemma_fusion.models.build import build_model
from gemma_fusion.models.trainable import part_of

log = logging.getLogger(__name__)


def load_run(run_dir: str | Path, for_export: bool = False, trust_remote_code: bool = False):
    """-> (FusionModel with the run's trainable weights, the run's config).

    `for_export`: a plain eager model on a full-precision base, even if the run trained with `backbone.quant`,
    `model.compile` or `model.gradient_checkpointing` (export merges the adapters into full-precision weights,
    then quantises once). `trust_remote_code`: see `check_remote_code_consent`.
    """
    run = RunDir(run_dir)
    weights = run.trainable
    for path in (run.config, weights):
        if not path.is_file():
            raise UserError(f"run={run_dir} has no {path.relative_to(run.root)}; pass a directory written by train.py.")
    cfg = run.load_config()
    check_targets(cfg, source=str(run.config))  # before anything is imported or built from it
    check_remote_code_consent(cfg, f"run={run_dir}", trust_remote_code)
    if for_export:
        cfg.backbone.quant, cfg.model.compile, cfg.model.gradient_checkpointing = "none", False, False
    model = build_model(cfg, saved=True)
    state = load_file(str(weights))
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(state) != expected:
        raise UserError(
            f"{weights} does not fit the model its config builds (missing {sorted(expected - set(state))[:3]}, "
            f"unexpected {sorted(set(state) - expected)[:3]}); was {run.config.name} edited?"
        )
    model.load_state_dict(state, strict=False)
    return model.eval(), cfg


def load_for_inference(path: str | Path, trust_remote_code: bool = False):
    """A train.py run directory or an export directory (see `artifacts/rundir.py`) -> (FusionModel, its config)."""
    kind = RunDir(path).kind()
    if kind == "export":
        return load_export(Path(path).expanduser(), trust_remote_code)
    if kind == "run":  # load_run says what is missing if training has not finished
        return load_run(Path(path).expanduser(), trust_remote_code=trust_remote_code)
    run, export = RunDir(path), ExportDir(path)
    raise UserError(f"run={path} is neither a train.py run directory ({run.config.name} and {run.final.name}/) nor "
                    f"an export ({export.meta.name}); pass the directory of a finished run or of an export.")


def init_from_run(model, run_dir: str | Path) -> dict[str, int]:
    """Start from an earlier run (a training stage, `model.init_from=RUN`): load its final trainable weights into
    every trainable parameter of `model` that exists there with the same shape; returns and logs the counts per
    part."""
    run = RunDir(run_dir)
    if not run.trainable.is_file():
        raise UserError(f"model.init_from={run_dir} has no {run.trainable.relative_to(run.root)}; pass the directory "
                        "of a finished earlier run (its hydra.run.dir).")
    saved = load_file(str(run.trainable))
    params = dict(model.named_parameters())
    loaded: dict[str, int] = {}
    for name, tensor in saved.items():
        if name in params and params[name].shape == tensor.shape:
            params[name].data.copy_(tensor)
            loaded[part_of(name)] = loaded.get(part_of(name), 0) + tensor.numel()
    if not loaded:
        raise UserError(f"model.init_from={run_dir}: none of its {len(saved)} tensors fits this model "
                        "(different projectors or backbone?).")
    log.info("initialised from %s: %s", run.trainable, ", ".join(f"{p} {n:,} parameters" for p, n in loaded.items()))
    return loaded
