"""The demo model at bf16 / int8 / int4 and a distilled int8 student: held-out exact match, memory, decode speed.

    python bench/inference_demo.py --run runs/demo [--student runs/demo_int8 ...] [--control RUN ...]
        [--out exports/bench] [--steps 32] [--split val|test]

For the trained run (`--run`, the teacher) it exports `quant=none dtype=bfloat16`, `quant=int8` and
`quant=int4` (bf16 base, LoRA merged; `python -m gemma_fusion.export`) into `--out`, then for the run itself
(float32, as trained), each export, the distilled student runs (`--student`, one or more, e.g. seeds; evaluated as
they trained: adapters on an int8 base) and the control runs (`--control`: the same student recipe without the KL
term, `distill.alpha=0`) measures, one after another in this process:

- held-out exact match on the run's `data.val` (`--split test`: its `data.test`, the split nothing was tuned on)
  (greedy, KV-cached; overall, image, audio), as `eval.py`;
- weights: bytes of every parameter and buffer of the model (quantised layers as stored), and of the backbone
  alone (decoder, embeddings, LM head; with the student's unmerged LoRA adapters);
- decode: time to first token (prefill of one image prompt) and tokens/s over `--steps` cached decode steps,
  batch 1, median of 3 repeats, on this CPU with torch's default threads.

Prints one JSON line per model and a final JSON line {"models": [...], "distillation", "machine", "date"}: each model
keeps `em_vs_teacher` of the teacher's exact match (target >= 0.95 for the student), `em_vs_teacher_ci` with its
paired bootstrap 95 % interval over the samples (per-sample records in OUT/records/<model>/); with `--student`,
"distillation" sets the student beside the plain int8 export (`distillation_effect`: student minus plain with its
interval, and "distillation adds nothing measurable" where that interval includes zero); with `--control`, also
student minus control (`student_minus_control`, `kl_verdict`): what the teacher's soft targets add over the same
extra steps with cross-entropy alone. With several students or controls the intervals resample runs and samples.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch


def decode_speed(model, batch: dict, steps: int, repeats: int = 3) -> tuple[float, float]:
    """(time to first token in s, decode tokens/s) for batch 1: prefill once, then `steps` cached steps."""
    from gemma_fusion.inference.generate import CachedDecoder

    ttfts, rates = [], []
    with torch.no_grad():
        for _ in range(repeats):
            decoder = CachedDecoder(model, batch)
            start = time.perf_counter()
            logits = decoder.start()
            ttfts.append(time.perf_counter() - start)
            alive = torch.ones(1, dtype=torch.bool)
            start = time.perf_counter()
            for _ in range(steps):  # eos ignored: the same number of steps for every model
                logits = decoder.step(logits.argmax(-1), alive)
            rates.append(steps / (time.perf_counter() - start))
    return statistics.median(ttfts), statistics.median(rates)


def measure(name: str, path: Path, steps: int, records: Path, split: str = "val") -> dict:
    from dataclasses import replace

    from gemma_fusion.core.schema import data_config
    from gemma_fusion.data.pipeline import make_loader, run_preprocessor
    from gemma_fusion.eval.evaluate import eval_shards, evaluate, prompt_only
    from gemma_fusion.models.quant import tensor_bytes
    from gemma_fusion.artifacts.load import load_for_inference
    from gemma_fusion.artifacts.rundir import RunDir

    model, cfg = load_for_inference(path)
    data = cfg.data
    preprocess = run_preprocessor(model, data, skip_long=False)
    shards = eval_shards(data, split)["shards"]
    loader = make_loader(data, preprocess, train=False, spec=shards, split_by_rank=False)
    result = evaluate(model, loader, max_new_tokens=16, predictions_path=RunDir(records).predictions)
    one = replace(data_config(data), eval_batch_size=1)
    first = next(iter(make_loader(one, preprocess, train=False, split_by_rank=False)))  # one image prompt
    ttft, rate = decode_speed(model, prompt_only(first, model.tokens.pad), steps)
    em = {"overall": result["overall"]["exact_match"],
          **{m: v["exact_match"] for m, v in result.get("modalities", {}).items()}}
    return {"model": name, "path": str(path), "records": str(records), "split": split, "shards": shards,
            "exact_match": em, "n": result["overall"]["n"],
            "weights_bytes": tensor_bytes(model), "backbone_bytes": tensor_bytes(model.backbone),
            "ttft_s": round(ttft, 4), "decode_tokens_per_s": round(rate, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="the trained demo run (the teacher)")
    parser.add_argument("--student", nargs="+", default=[], help="distilled student runs (experiment=distill)")
    parser.add_argument("--control", nargs="+", default=[],
                        help="the same student recipe without the KL term (experiment=distill distill.alpha=0)")
    parser.add_argument("--out", default="exports/bench", help="where the exports go")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed")
    parser.add_argument("--split", choices=("val", "test"), default="val",
                        help="the runs' data.val or data.test (exact match)")
    args = parser.parse_args()

    from gemma_fusion.eval.compare import distillation_effect, paired, read_records
    from gemma_fusion.export import export_run

    out = Path(args.out)
    models = [("run float32", Path(args.run))]
    for quant in ("none", "int8", "int4"):
        target = out / f"{quant}_bf16"
        export_run(args.run, target, quant, dtype="bfloat16", overwrite=True)
        models.append((f"export {'bf16' if quant == 'none' else quant}", target))
    students = [(f"student int8 (distilled){'' if i == 0 else f' {i + 1}'}", Path(run))
                for i, run in enumerate(args.student)]
    controls = [(f"control int8 (no KL){'' if i == 0 else f' {i + 1}'}", Path(run)) for i, run in enumerate(args.control)]
    if controls and not students:
        parser.error("--control needs --student: a control is the student's recipe without the KL term")
    models += students + controls
    rows = []
    for name, path in models:
        records = out / "records" / re.sub(r"\W+", "_", name).strip("_")  # e.g. student_int8_distilled
        records.mkdir(parents=True, exist_ok=True)
        row = measure(name, path, args.steps, records, args.split)
        rows.append(row)
        print(json.dumps(row), flush=True)
    teacher = rows[0]["exact_match"]["overall"]
    by_model = {row["model"]: read_records(Path(row["records"])) for row in rows}
    for row in rows:
        row["em_vs_teacher"] = round(row["exact_match"]["overall"] / teacher, 4) if teacher else None
        row["em_vs_teacher_ci"] = paired(by_model[row["model"]], by_model["run float32"])["exact_match_ratio"]
    distillation = None
    if students:
        distillation = distillation_effect(by_model["run float32"], by_model["export int8"],
                                           [by_model[name] for name, _ in students],
                                           [by_model[name] for name, _ in controls] or None)
        print(distillation["verdict"], flush=True)
        if controls:
            print(distillation["kl_verdict"], flush=True)
    print(json.dumps({"models": rows, "distillation": distillation, "threads": torch.get_num_threads(),
                      "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
                      "date": datetime.date.today().isoformat()}))


if __name__ == "__main__":
    main()
