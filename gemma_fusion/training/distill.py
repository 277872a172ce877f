"""Knowledge distillation: a finished run (the teacher) teaches this run's model (the student) on the response tokens.

`distill=teacher distill.teacher=RUN` (or `experiment=distill`, an int8 student started from the teacher):

    loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy(student, labels)

over the target tokens only (labels != -100), with both distributions softened by the temperature T.
The teacher is a train.py run or an export directory: the fine-tuned model at full precision, a run on a
larger backbone, or an encoder baseline; the student is whatever this run builds (a quantised backbone, a
smaller one, fewer image tokens).

Two ways to get the teacher's distribution:
- online (`distill.cache=null`): the teacher runs on the student's batch each step (so under the student's
  preprocessing), KL over the whole vocabulary (`top_k=0`) or the teacher's top k.
- cached (`distill.cache=DIR`): the first run passes once over the training shards with the teacher under its
  own preprocessing and writes the teacher's top-k log-probabilities of every target token of every sample
  to DIR (safetensors files + index.json, keyed by sample key); every later step reads them instead of running
  the teacher, so the teacher runs once and the student may use another image-token budget. KL is then over the
  teacher's top k (renormalised), the usual sparse distillation.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from gemma_fusion.artifacts.rundir import ExportDir, RunDir
from gemma_fusion.core.batch import model_inputs
from gemma_fusion.artifacts.load import load_for_inference
from gemma_fusion.data.pipeline import make_loader, run_preprocessor
from gemma_fusion.core.errors import UserError
from gemma_fusion.core.files import staged_directory
from gemma_fusion.core.schema import DataConfig
from gemma_fusion.core.batch import IGNORE_INDEX

log = logging.getLogger(__name__)
CACHE_FORMAT = "gemma_fusion.teacher_topk/1"
SAMPLES_PER_FILE = 4096


def load_teacher(path: str | Path):
    """A run directory or an export directory -> (frozen FusionModel in eval mode, its config)."""
    model, cfg = load_for_inference(path)
    model.requires_grad_(False)
    return model.eval(), cfg


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
            indices: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * KL(teacher || student) per token, averaged over tokens.

    student: [N, V] logits. teacher: [N, V] logits (indices None), or [N, k] log-probabilities at `indices`
    [N, k] (a top-k teacher; renormalised over the k).
    """
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher.float() / temperature, dim=-1)  # (top-k log-probs: renormalised over the k at T)
    if indices is not None:
        log_q = log_q.gather(-1, indices.long())  # the student's full distribution, at the teacher's k
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return kl.mean() * temperature**2 if kl.numel() else student.sum() * 0.0


def target_counts(batch: dict) -> list[int]:
    """Target tokens of each row of a batch, in the order FusionModel returns their logits."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).tolist()


class Distiller:
    """The teacher side of the loss: `teacher_logits(batch)` -> (logits or top-k log-probs, top-k indices or None)."""

    def __init__(self, teacher_path: str, alpha: float = 0.5, temperature: float = 2.0, top_k: int = 0,
                 cache: str | None = None):
        if not 0.0 <= alpha <= 1.0:
            raise UserError(f"distill.alpha={alpha} must be between 0 (cross-entropy only) and 1 (KL only).")
        if temperature <= 0:
            raise UserError(f"distill.temperature={temperature} must be > 0.")
        teacher = RunDir(teacher_path)
        if teacher.kind() is None:
            raise UserError(f"distill.teacher={teacher_path} is neither a train.py run ({teacher.config.name} + "
                            f"{teacher.final.name}/) nor an export ({ExportDir(teacher_path).meta.name}); pass the "
                            "directory of a finished run.")
        if cache and top_k <= 0:
            raise UserError("distill.cache stores the teacher's top-k log-probabilities: set distill.top_k (e.g. 32).")
        self.teacher_path, self.alpha, self.temperature, self.top_k = teacher_path, alpha, temperature, top_k
        self.cache_dir = Path(cache).expanduser() if cache else None
        self.teacher = None
        self.cached: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def setup(self, device, train_spec, batch_size: int, allow_pipe: bool = False) -> None:
        """Load the teacher (online) or the cache (writing it first if it does not exist)."""
        if self.cache_dir is None:
            self.teacher = load_teacher(self.teacher_path)[0].to(device)
            return
        if not (self.cache_dir / "index.json").is_file():
            write_cache(self.teacher_path, train_spec, self.cache_dir, self.top_k, batch_size, device, allow_pipe)
        self.cached = read_cache(self.cache_dir, self.teacher_path, self.top_k)

    def teacher_logits(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        counts = target_counts(batch)
        if self.cached is not None:
            keys = [m["key"] for m in batch["meta"]]
            missing = [k for k in keys if k not in self.cached]
            if missing:
                raise UserError(f"distill.cache={self.cache_dir} has no teacher outputs for sample {missing[0]!r}; it "
                                "was written for other data: delete it (it is rewritten) or point distill.cache elsewhere.")
            rows = [self.cached[k] for k in keys]
            if [len(r[0]) for r in rows] != counts:
                raise UserError("distill.cache: the teacher's target tokens per sample differ from this batch's "
                                "(another tokenizer, or packed rows: set data.pack_length=0).")
            device = batch["labels"].device
            logprobs = torch.cat([r[1] for r in rows]).to(device)
            return logprobs, torch.cat([r[0] for r in rows]).to(device)
        with torch.no_grad():
            out = self.teacher(**model_inputs(batch))
        if out.logits.shape[0] != sum(counts):
            raise UserError("distill: the teacher reads this batch's targets as a different number of tokens (another "
                            "tokenizer?); distil between models that share the backbone's tokenizer.")
        if self.top_k:
            values, indices = out.logits.float().topk(self.top_k, dim=-1)
            return F.log_softmax(values, dim=-1), indices
        return out.logits, None

    def loss(self, student_logits: torch.Tensor, targets: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        """{"loss", "kl", "ce"} for the student's target logits [N, V] and their target ids [N]."""
        teacher, indices = self.teacher_logits(batch)
        kl = kd_loss(student_logits, teacher, self.temperature, indices)
        ce = F.cross_entropy(student_logits.float(), targets) if len(targets) else kl * 0.0
        return {"loss": self.alpha * kl + (1 - self.alpha) * ce, "kl": kl, "ce": ce}


@torch.no_grad()
def write_cache(teacher_path: str, train_spec, cache_dir: Path, top_k: int, batch_size: int, device,
                allow_pipe: bool = False) -> dict:
    """One pass over the training shards with the teacher under its own preprocessing: its top-k log-probs of every
    target token of every sample -> cache_dir (written in a temporary directory, renamed into place at the end)."""
    teacher, tcfg = load_teacher(teacher_path)
    teacher.to(device)
    preprocess = run_preprocessor(teacher, tcfg.data)
    loader = make_loader(DataConfig(eval_batch_size=batch_size, allow_pipe=allow_pipe), preprocess, train=False,
                         spec=train_spec, split_by_rank=False)  # every sample once, in order
    files, pending, samples = [], {}, 0
    with staged_directory(cache_dir) as tmp:  # an interrupted pass leaves no partial cache

        def flush():
            name = f"topk-{len(files):06d}.safetensors"
            save_file(pending, str(tmp / name))
            files.append(name)
            pending.clear()

        for batch in tqdm(loader, desc="teacher top-k cache", unit="batch"):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            out = teacher(**model_inputs(batch))
            values, indices = out.logits.float().topk(top_k, dim=-1)
            logprobs = F.log_softmax(values, dim=-1)
            start = 0
            for meta, n in zip(batch["meta"], target_counts(batch)):
                pending[f"{meta['key']}/indices"] = indices[start:start + n].to(torch.int32).cpu().contiguous()
                pending[f"{meta['key']}/logprobs"] = logprobs[start:start + n].to(torch.float16).cpu().contiguous()
                start, samples = start + n, samples + 1
            if len(pending) >= 2 * SAMPLES_PER_FILE:
                flush()
        if pending:
            flush()
        index = {"format": CACHE_FORMAT, "teacher": str(Path(teacher_path).absolute()), "top_k": top_k,
                 "samples": samples, "files": files}
        (tmp / "index.json").write_text(json.dumps(index, indent=2))
    log.info("distill: cached the teacher's top-%d of %d samples in %s", top_k, samples, cache_dir)
    return index


def read_cache(cache_dir: Path, teacher_path: str, top_k: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{sample key: (indices [n, k], log-probs [n, k])} of a cache written by `write_cache` for this teacher."""
    index = json.loads((cache_dir / "index.json").read_text())
    if index.get("format") != CACHE_FORMAT:
        raise UserError(f"distill.cache={cache_dir} is not a teacher cache ({index.get('format')!r}).")
    if index["teacher"] != str(Path(teacher_path).absolute()) or index["top_k"] != top_k:
        raise UserError(f"distill.cache={cache_dir} holds the top-{index['top_k']} of teacher {index['teacher']}, not "
                        f"the top-{top_k} of {Path(teacher_path).absolute()}; delete it or point distill.cache elsewhere.")
    cached: dict[str, list] = {}
    for name in index["files"]:
        for key, tensor in load_file(str(cache_dir / name)).items():
            sample, _, kind = key.rpartition("/")
            cached.setdefault(sample, [None, None])[0 if kind == "indices" else 1] = tensor
    return {k: (v[0], v[1]) for k, v in cached.items()}
