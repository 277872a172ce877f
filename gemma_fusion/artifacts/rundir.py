"""Every path of a run directory, an export directory and a sweep, spelt once, with the run's own save/load.

The layout is a contract users script against (keep it); no other module spells these names.

    RUN/                                a train.py run (`hydra.run.dir`)
    ├── config.yaml                     the resolved config as plain YAML: what the run's model is rebuilt from
    ├── environment.json                python, torch, transformers, peft, lightning, torchaudio versions; CPU, GPU
    ├── .hydra/overrides.yaml           the command-line overrides (written by Hydra)
    ├── compute.json                    parameters, soft tokens, forward FLOPs (training/compute.py)
    ├── metrics.csv                     one row per logged step (Lightning's CSV logger)
    ├── metrics.segment-NNN.csv         earlier segments of a resumed run, merged into metrics.csv at its end
    ├── wandb_run_id                    (logger.wandb=true) a resumed run continues the same wandb run
    ├── checkpoints/step-NNNNNNN.ckpt   Lightning checkpoints of the trainable weights (+ data state)
    │   └── *.ckpt.tmp                  a save cut short by a kill (never read; resume=auto removes it)
    ├── final/
    │   ├── trainable.safetensors       projectors + adapters, nothing of the frozen backbone
    │   └── adapter/                    (lora.r > 0) the adapters in peft's format
    ├── eval.json                       eval.py / eval_after_train: loss, EM, CER, WER per task and modality,
    │                                   the split and shards evaluated
    ├── eval_predictions.jsonl          one record per evaluated sample
    └── eval_compare.json               eval.py run=RUN compare=[...]: the comparison, in the first run

    OUT/                                `python -m gemma_fusion.export out=OUT`
    ├── export.json                     format, quant, quantised layers, the run's config
    ├── config.json, model.safetensors  the backbone (transformers' names; quantised layers as qweight + scale)
    ├── projectors.safetensors          the trained projectors, float32
    └── tokenizer files, generation / processor / chat-template files

    SWEEP/                              `python train.py -m ... hydra.sweep.dir=SWEEP`
    ├── 0/, 1/, ...                     one RUN per job
    ├── report.md, report.json          `python -m gemma_fusion.report SWEEP`
    └── loss_curves.png, metric_vs_compute.png, scaling.png, scaling_residuals.png
"""
from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from gemma_fusion.core.config import save_yaml

log = logging.getLogger(__name__)

PACKAGES = ("torch", "transformers", "peft", "lightning", "torchaudio")  # what a run's figures depend on


def environment() -> dict:
    """What a figure depends on besides its config: python and package versions, the CPU and GPU model
    (RUN/environment.json; the benchmarks print the same block)."""
    import torch  # (only here: the paths of a run need no torch)

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"python": platform.python_version(), **versions, "cuda": torch.version.cuda, "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(), "gpu": torch.cuda.get_device_name(0) if gpus else None, "gpu_count": gpus,
            "platform": platform.platform()}


def _cpu_model() -> str:
    """The model name from /proc/cpuinfo (Linux), else what `platform` knows (often empty on Linux)."""
    try:
        with open("/proc/cpuinfo") as lines:
            for line in lines:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


@dataclass(frozen=True)
class _Directory:
    """A directory of a known layout: `root` (a str or Path, `~` expanded); paths only, nothing is created."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root).expanduser())

    def __str__(self) -> str:
        return str(self.root)


@dataclass(frozen=True)
class RunDir(_Directory):
    """A train.py run directory (see the module docstring). Paths only: nothing is created until written."""

    # --- the files and folders -------------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def hydra(self) -> Path:
        """Hydra's own folder: its presence marks a job of a sweep."""
        return self.root / ".hydra"

    @property
    def overrides(self) -> Path:
        return self.hydra / "overrides.yaml"

    @property
    def environment(self) -> Path:
        return self.root / "environment.json"

    @property
    def compute(self) -> Path:
        return self.root / "compute.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def wandb_id(self) -> Path:
        return self.root / "wandb_run_id"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def trainable(self) -> Path:
        return self.final / "trainable.safetensors"

    @property
    def adapter(self) -> Path:
        return self.final / "adapter"

    @property
    def eval(self) -> Path:
        return self.root / "eval.json"

    @property
    def predictions(self) -> Path:
        return self.root / "eval_predictions.jsonl"

    @property
    def eval_compare(self) -> Path:
        return self.root / "eval_compare.json"

    def metrics_segments(self) -> list[Path]:
        """The set-aside metrics of earlier segments of a resumed run, oldest first."""
        return sorted(self.root.glob("metrics.segment-*.csv"))

    def next_metrics_segment(self) -> Path:
        """Where `metrics.csv` goes when a resumed run sets it aside."""
        return self.root / f"metrics.segment-{len(self.metrics_segments()):03d}.csv"

    def checkpoint_files(self) -> list[Path]:
        """The complete checkpoints, oldest first (their names hold the zero-padded step)."""
        return sorted(self.checkpoints.glob("*.ckpt"))

    def partial_checkpoints(self) -> list[Path]:
        """Checkpoint saves cut short by a kill (`*.ckpt.tmp`)."""
        return sorted(self.checkpoints.glob("*.ckpt.tmp"))

    # --- what the directory holds ------------------------------------------------------------------------------
    def kind(self) -> str | None:
        """"export" (a `gemma_fusion.export` directory), "run" (a train.py run directory) or None."""
        if ExportDir(self.root).meta.is_file():
            return "export"
        return "run" if self.config.is_file() else None

    def is_finished(self) -> bool:
        """Training wrote its final weights (config.yaml and final/trainable.safetensors exist)."""
        return self.config.is_file() and self.trainable.is_file()

    def newest_checkpoint(self, remove_partial: bool = True) -> Path | None:
        """The newest complete checkpoint (what `resume=auto` continues from), or None. `remove_partial`: delete
        the leftovers of saves cut short by a kill on the way (they are never read)."""
        if remove_partial:
            for partial in self.partial_checkpoints():
                log.warning("removing %s: a checkpoint save that did not finish", partial)
                partial.unlink(missing_ok=True)
        found = self.checkpoint_files()
        return found[-1] if found else None

    # --- save / load ------------------------------------------------------------------------------------------
    def save_config(self, cfg: DictConfig) -> Path:
        """RUN/config.yaml: the resolved config as plain YAML."""
        self.root.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, self.config)
        return self.config

    def load_config(self) -> DictConfig:
        return OmegaConf.load(self.config)

    def read_overrides(self) -> list[str] | None:
        """The command-line overrides Hydra recorded, or None when the run has none recorded."""
        return yaml.safe_load(self.overrides.read_text()) if self.overrides.is_file() else None

    def write_environment(self, record: dict) -> Path:
        """RUN/environment.json, written when a run starts; a run resumed in another environment keeps the earlier
        ones under `earlier`."""
        old = _read_json(self.environment)
        earlier = [] if old is None else old.pop("earlier", [])
        if old is not None and old != record:
            earlier.append(old)
        return _write_json(self.environment, {**record, "earlier": earlier} if earlier else record)

    def read_environment(self) -> dict | None:
        return _read_json(self.environment)

    def write_compute(self, report: dict) -> Path:
        return _write_json(self.compute, report)

    def read_compute(self) -> dict | None:
        return _read_json(self.compute)

    def write_eval(self, result: dict) -> Path:
        return _write_json(self.eval, result)

    def read_eval(self) -> dict | None:
        return _read_json(self.eval)

    def write_eval_compare(self, comparison: dict) -> Path:
        return _write_json(self.eval_compare, comparison)


@dataclass(frozen=True)
class ExportDir(_Directory):
    """A `python -m gemma_fusion.export` directory (see the module docstring)."""

    @property
    def meta(self) -> Path:
        return self.root / "export.json"

    @property
    def model(self) -> Path:
        """The backbone's weights (written by transformers' save_pretrained when unquantised)."""
        return self.root / "model.safetensors"

    @property
    def projectors(self) -> Path:
        return self.root / "projectors.safetensors"

    def write_meta(self, meta: dict) -> Path:
        return _write_json(self.meta, meta)


@dataclass(frozen=True)
class SweepDir(_Directory):
    """A `hydra.sweep.dir`: one run per job, and the report `python -m gemma_fusion.report` writes."""

    def jobs(self) -> list[RunDir]:
        """The jobs' run directories in the order the sweep ran them (numbered first, by number)."""
        found = [p for p in self.root.iterdir() if p.is_dir() and RunDir(p).hydra.is_dir()]
        found.sort(key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else p.name))
        return [RunDir(p) for p in found]

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def loss_curves(self) -> Path:
        return self.root / "loss_curves.png"

    @property
    def metric_vs_compute(self) -> Path:
        return self.root / "metric_vs_compute.png"

    @property
    def scaling(self) -> Path:
        return self.root / "scaling.png"

    @property
    def scaling_residuals(self) -> Path:
        return self.root / "scaling_residuals.png"
