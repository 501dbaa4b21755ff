#!/usr/bin/env bash
# GPU check on one lent GPU (H200): LoRA, QLoRA 4-bit, DoRA, full + DeepSpeed ZeRO-3, full + FSDP2 on a
# random-weight 1.1B Llama, 50 steps each; writes bench/gpu_results.json and bench/gpu_results.md.
# Budget: ~8 minutes (model creation ~30 s, each run <= 150 s, typically well under a minute).
# Usage: bench/gpu_check.sh [extra gpu_check.py flags, e.g. --runs lora,dora --steps 30]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec timeout 470 "$PY" bench/gpu_check.py "$@"
