"""Evaluate a FusionModel on a loader: teacher-forced loss and greedy-generation EM / CER / WER per task."""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from gemma_fusion.artifacts.rundir import RunDir
from gemma_fusion.core.config import to_plain
from gemma_fusion.core.errors import UserError
from gemma_fusion.core.schema import data_config
from gemma_fusion.eval.metrics import score
from gemma_fusion.inference.generate import greedy_generate
from gemma_fusion.core.batch import IGNORE_INDEX
from gemma_fusion.data.pipeline import make_loader, run_preprocessor
from gemma_fusion.models.fusion import FusionModel

SPLITS = ("val", "test")  # `data.eval=val|test`: the run's data.val / data.test
MODEL_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_position_ids", "input_features",
              "input_features_mask", "labels", "mm_token_type_ids")


def prompt_only(batch: dict, pad_id: int) -> dict:
    """The same batch cut before each row's first target token (a generation prompt)."""
    has_label = batch["labels"] != IGNORE_INDEX
    lengths = torch.where(has_label.any(1), has_label.float().argmax(1), batch["attention_mask"].sum(1))
    keep = torch.arange(batch["input_ids"].shape[1]) < lengths[:, None]
    return {**batch, "input_ids": batch["input_ids"].masked_fill(~keep, pad_id), "attention_mask": keep.long(),
            "mm_token_type_ids": batch["mm_token_type_ids"].masked_fill(~keep, 0)}


@torch.no_grad()
def evaluate(model: FusionModel, loader, max_new_tokens: int = 16, predictions_path: str | Path | None = None) -> dict:
    """Returns {"overall": {...}, "tasks": {task: {...}}, "modalities": {"image": {...}, ...}}.

    Each entry holds loss (teacher-forced, per target token), exact_match, cer, wer (greedy) and n.
    """
    model.eval()
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    records = []
    for batch in tqdm(loader, desc="evaluating", unit="batch"):
        out = model(**{k: batch[k] for k in MODEL_KEYS if k in batch})
        targets = batch["labels"][:, 1:]
        selected = targets != IGNORE_INDEX
        token_loss = F.cross_entropy(out.logits, targets[selected], reduction="none")
        row_of = selected.nonzero()[:, 0]
        row_loss = torch.zeros(len(batch["meta"])).index_add_(0, row_of, token_loss.float())
        row_tokens = torch.bincount(row_of, minlength=len(batch["meta"]))
        generated = greedy_generate(model, prompt_only(batch, model.tokens.pad), max_new_tokens)
        for i, meta in enumerate(batch["meta"]):
            text = model.tokenizer.decode(generated[i], skip_special_tokens=True)
            metrics = score(text, meta["target"])
            for bucket in ("overall", meta["task"], f"modality:{meta['modality']}"):
                s = sums[bucket]
                s["loss_sum"] += float(row_loss[i])
                s["tokens"] += int(row_tokens[i])
                s["n"] += 1
                for k, v in metrics.items():
                    s[k] += v
            records.append({**meta, "prediction": text, **metrics,
                            "loss": float(row_loss[i]) / max(1, int(row_tokens[i]))})
    if predictions_path is not None:
        Path(predictions_path).write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {b: {"loss": s["loss_sum"] / max(1, s["tokens"]), "exact_match": s["exact_match"] / s["n"],
                   "cer": s["cer"] / s["n"], "wer": s["wer"] / s["n"], "n": int(s["n"])} for b, s in sums.items()}
    modalities = {k.split(":", 1)[1]: summary.pop(k) for k in sorted(summary) if k.startswith("modality:")}
    return {"overall": summary.pop("overall", {}), "tasks": dict(sorted(summary.items())), "modalities": modalities}


def print_table(result: dict) -> None:
    rows = [("overall", result["overall"]), *result["tasks"].items(),
            *((f"[{k}]", v) for k, v in result.get("modalities", {}).items())]
    print(f"{'task':<12} {'n':>5} {'loss':>8} {'EM':>7} {'CER':>7} {'WER':>7}")
    for name, m in rows:
        print(f"{name:<12} {m['n']:>5} {m['loss']:>8.4f} {m['exact_match']:>7.3f} {m['cer']:>7.3f} {m['wer']:>7.3f}")


def eval_shards(data, spec=None) -> dict:
    """{"split", "shards"}: what `spec` names among the run's `data` splits. null or `val` -> data.val, `test` ->
    data.test, other shards -> themselves, with split `val` / `test` when they are the run's, else null."""
    choice = to_plain(spec)
    if choice is None or choice in SPLITS:
        split = choice or "val"
        shards = to_plain(data.get(split))
        if shards is None:
            raise UserError(f"data.eval={split}: the run has no data.{split} (it was trained without one); pass "
                            "data.eval=SHARDS.")
        return {"split": split, "shards": shards}
    split = next((name for name in SPLITS if _same_shards(choice, to_plain(data.get(name)))), None)
    return {"split": split, "shards": choice}


def _same_shards(a, b) -> bool:
    """Two shard specs that are equal, or paths to the same place (`data/demo/test`, `/repo/data/demo/test/`)."""
    paths = isinstance(a, str) and isinstance(b, str)
    return a == b or (paths and Path(a).expanduser().resolve() == Path(b).expanduser().resolve())


def evaluate_into(run_dir: str | Path, model: FusionModel, data, spec=None, batch_size: int | None = None,
                  max_new_tokens: int = 16) -> dict:
    """Evaluate on `spec` (default `data.val`; `val` / `test`: the run's split) with the run's preprocessing; write
    `RunDir.eval` (with what was evaluated under "data", see `eval_shards`) and the per-sample `RunDir.predictions`,
    print a table."""
    run = RunDir(run_dir)
    evaluated = eval_shards(data, spec)
    preprocess = run_preprocessor(model, data, skip_long=False)
    reading = replace(data_config(data), eval_batch_size=batch_size) if batch_size else data
    loader = make_loader(reading, preprocess, train=False, spec=evaluated["shards"],
                         split_by_rank=False)  # one process evaluates all of it, also inside a DDP run
    result = {**evaluate(model, loader, max_new_tokens, predictions_path=run.predictions), "data": evaluated}
    run.write_eval(result)
    print(f"{evaluated['split'] or 'shards'}: {evaluated['shards']}")
    print_table(result)
    return result
