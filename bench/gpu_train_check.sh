#!/usr/bin/env bash
# The training features that only a GPU exercises, each a short real run of train.py on the smoke data
# and the project's tiny backbone (bf16 weights): bf16-mixed, int8 / int4 frozen base (native and torchao),
# torch.compile, and FSDP with a checkpoint, a resume and the gathered final weights.
# Prints one JSON line per run (loss, tokens/s, peak memory) and writes them all to ${OUT:-.}/gpu_train_check.json.
#   bash bench/gpu_train_check.sh          (about 4 minutes on one H200, after `python train.py experiment=smoke` made the data)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.}
RUNS=$(mktemp -d)
COMMON=(experiment=smoke backbone.dtype=bfloat16 trainer.max_steps=60 eval_after_train=false
        trainer.enable_progress_bar=false lora=all_linear_r16)

summarise() {  # name run_dir exit_code seconds
  ${PYTHON:-python3} - "$@" <<'EOF'
import csv, json, statistics, sys
name, run, rc, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
result = {"run": name, "exit": rc, "wall_s": round(seconds, 1)}
try:
    rows = list(csv.DictReader(open(f"{run}/metrics.csv")))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    tps = [float(r["train/tokens_per_s"]) for r in rows if r.get("train/tokens_per_s")][5:]
    mem = [float(r["train/peak_mem_gb"]) for r in rows if r.get("train/peak_mem_gb")]
    mfu = [float(r["train/mfu"]) for r in rows if r.get("train/mfu")][5:]
    result.update(steps=len(losses), first_loss=round(losses[0], 4), last5_loss=round(statistics.mean(losses[-5:]), 4),
                  tokens_per_s=round(statistics.median(tps)), peak_mem_gb=round(max(mem), 3),
                  mfu=round(statistics.median(mfu), 6) if mfu else None)
except Exception as err:  # a failed run: its exit code and log tail say why
    result["error"] = repr(err)[:200]
print(json.dumps(result), flush=True)
EOF
}

want() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }  # ONLY="quant mid fsdp": a subset of the groups

run() {  # name, overrides... (TRAINER: the trainer group, gpu by default; RUN_DIR: the run directory)
  local name=$1; shift
  local start=$SECONDS dir=${RUN_DIR:-$RUNS/$name}
  ${PYTHON:-python3} train.py "${COMMON[@]}" trainer="${TRAINER:-gpu}" hydra.run.dir="$dir" "$@" >"$RUNS/$name.log" 2>&1
  local rc=$?
  [ $rc -ne 0 ] && tail -5 "$RUNS/$name.log" >&2
  summarise "$name" "$dir" $rc $((SECONDS - start)) | tee -a "$OUT/gpu_train_check.jsonl"
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
${PYTHON:-python3} -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
rm -f "$OUT/gpu_train_check.jsonl"
if want quant; then
  run bf16
  run int8_native backbone.quant=int8
  run int4_native backbone.quant=int4
  run int8_torchao backbone.quant=int8 backbone.quant_backend=torchao
  run int4_torchao backbone.quant=int4 backbone.quant_backend=torchao
fi
want compile && run compile model.compile=true
if want mid; then
# Memory of the frozen base: a random Gemma-4-shaped backbone (hidden 2048, 8 layers, global head dim 512)
${PYTHON:-python3} - "$RUNS/mid" <<'EOF'
import sys, torch
from transformers import Gemma4UnifiedForConditionalGeneration
from gemma_fusion.models.tiny import tiny_gemma4_config
from gemma_fusion.models.tokenizer import build_byte_tokenizer
config = tiny_gemma4_config(hidden_size=2048, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                            head_dim=256, intermediate_size=8192)
Gemma4UnifiedForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(sys.argv[1])
build_byte_tokenizer().save_pretrained(sys.argv[1])
EOF
for q in none int8 int4; do
  run "mid_$q" backbone.path="$RUNS/mid" '~backbone.pretrain' backbone.quant=$q trainer.max_steps=30
done
fi
want fsdp || exit 0
# FSDP: stop at 30 with a checkpoint every 10, resume to 60, final weights gathered, evaluation on a rebuilt copy
TRAINER=fsdp RUN_DIR=$RUNS/fsdp run fsdp_part1 trainer.devices=1 trainer.max_steps=30 checkpoint.every_n_steps=10
TRAINER=fsdp RUN_DIR=$RUNS/fsdp run fsdp_resumed trainer.devices=1 checkpoint.every_n_steps=10 resume=auto eval_after_train=true
${PYTHON:-python3} - "$RUNS/fsdp" <<'EOF' | tee -a "$OUT/gpu_train_check.jsonl"
import json, sys
from pathlib import Path
from safetensors.torch import load_file
run = Path(sys.argv[1])
final = load_file(run / "final" / "trainable.safetensors")
print(json.dumps({"run": "fsdp_files", "checkpoints": sorted(p.name for p in (run / "checkpoints").glob("*.ckpt")),
                  "final_tensors": len(final), "lora_tensors": sum("lora_" in k for k in final),
                  "adapter": (run / "final" / "adapter" / "adapter_model.safetensors").is_file(),
                  "eval": json.loads((run / "eval.json").read_text())["overall"] if (run / "eval.json").is_file() else None}))
EOF
${PYTHON:-python3} -c "import json,sys; rows=[json.loads(l) for l in open('$OUT/gpu_train_check.jsonl')]; json.dump(rows, open('$OUT/gpu_train_check.json','w'), indent=1)"
