#!/usr/bin/env bash
# Wrap any launcher in Nsight Systems, capturing only the engine's profiling window:
# the engine calls cudaProfilerStart before step PROFILE_START and cudaProfilerStop after
# step PROFILE_END (profile.start_step / profile.end_step on PROFILE_RANKS), and
# `nsys profile --capture-range=cudaProfilerApi` records exactly that range, with the
# engine's NVTX ranges (forward-backward, optimizer-step, data, checkpoint).
#
#   bash launchers/profile_nsys.sh launchers/pretrain_3b_b200.sh [dotted.key=value ...]
#   # a short bf16 run of the 3B preset on one GPU:
#   GPUS_PER_NODE=1 DTYPE=bf16 SEQ=2048 GBS=8 MBS=1 STEPS=8 DATA_MOCK=1 \
#     bash launchers/profile_nsys.sh launchers/pretrain_3b_b200.sh checkpoint.enabled=false
#   DRY_RUN=1 bash launchers/profile_nsys.sh launchers/pretrain_3b_b200.sh
set -euo pipefail
# shellcheck source=launchers/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [ "$#" -lt 1 ] || [ ! -f "$1" ]; then
  echo "usage: bash launchers/profile_nsys.sh LAUNCHER.sh [dotted.key=value ...]" >&2
  exit 2
fi
launcher="$1"
shift
if [ "${CPU_TINY:-0}" = "1" ]; then
  echo "[launch] error: Nsight profiling needs a GPU; CPU_TINY runs cannot be profiled with nsys" >&2
  exit 1
fi
decide_mode

setting PROFILE_START 5 "" "first profiled step (the first steps include warm-up and allocation)"
setting PROFILE_END 7 "" "last profiled step"
setting PROFILE_RANKS 0 "" "comma-separated ranks that open the window"
setting NSYS_OUTPUT "runs/nsys/$(basename "$launcher" .sh)-$(date +%Y%m%d-%H%M%S)" "" "report path (.nsys-rep is added)"
setting NSYS_TRACE cuda,nvtx,osrt,cudnn,cublas "" "nsys --trace APIs"
print_settings

# --capture-range-end=stop: after the window the run continues unprofiled (the default,
# stop-shutdown, would kill it). Child processes (torchrun's ranks) are followed by default.
nsys_cmd=(nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop
          "--trace=$NSYS_TRACE" --sample=none --cpuctxsw=none --force-overwrite=true
          "--output=$NSYS_OUTPUT")
show_cmd "nsys command" "${nsys_cmd[@]}" bash "$launcher" "$@"
if [ "$RUN_MODE" = "dry" ]; then
  exec bash "$launcher" "$@"
fi
if ! command -v nsys >/dev/null 2>&1; then
  echo "[launch] error: nsys (Nsight Systems CLI) is not on PATH" >&2
  exit 1
fi
mkdir -p "$(dirname "$NSYS_OUTPUT")"
exec "${nsys_cmd[@]}" bash "$launcher" "$@"
