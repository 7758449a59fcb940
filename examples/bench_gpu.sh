#!/usr/bin/env bash
# One-GPU throughput matrix of the torch-native path (see README "Performance switches").
#   bash examples/bench_gpu.sh [OUT_DIR] [extra bench_gpu.py arguments]
# Runs in under 8 minutes (--budget-s 450); prints the table and writes OUT_DIR/bench_gpu.{json,md}.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/bench_gpu}"
shift || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec python examples/bench_gpu.py --out "$out" "$@"
