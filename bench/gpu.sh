#!/usr/bin/env bash
# Training MFU and decode speed on a Gemma-4-12B-shaped slice (full width, 6 layers, random bf16 weights), one GPU:
# projector + LoRA r16 training on a 4096-token row with a 1120-token image (tokens/s, MFU, peak memory), then
# cached decode tokens/s after a 1024-token prompt in bf16, int8 and int4 (native) and torchao int8.
# One JSON line per measurement, echoed and written to ${OUT:-.}/gpu.json; the measuring is bench/gpu_bench.py.
#   bash bench/gpu.sh          (about 2 minutes on one H200; stopped at ${LIMIT_S:-470} s in any case)
set -uo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "bench/gpu.sh needs an NVIDIA GPU (nvidia-smi not found); on a CPU, python bench/gpu_bench.py --cpu-smoke."
  exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2
timeout "${LIMIT_S:-470}" ${PYTHON:-python3} bench/gpu_bench.py --out "${OUT:-.}" "$@"
