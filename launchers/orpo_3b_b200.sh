#!/usr/bin/env bash
# ORPO preference training of frankenstallm-3b on one node of 8 B200 GPUs from the SFT
# checkpoint: lambda 0.25, lr 1.2e-5, 128 preference pairs per step. Settings are
# overridable from the environment; extra arguments are dotted overrides for the engine.
#
#   SFT_CKPT=runs/sft_3b_b200/checkpoints/iter_0003000 PREF_DATA=data/pref/pairs \
#     bash launchers/orpo_3b_b200.sh
#   DRY_RUN=1 bash launchers/orpo_3b_b200.sh
set -euo pipefail
# shellcheck source=launchers/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
decide_mode

setting PRESET frankenstallm-3b tiny-llama "model preset"
setting TP 1 "" "tensor-parallel size"
setting SEQ 4096 64 "sequence length of prompt + response"
setting PAIRS 128 4 "preference pairs per optimizer step (training.global_batch_size)"
setting MBS 1 "" "pairs per micro-batch per GPU"
setting DTYPE bf16 fp32 "precision.dtype"
setting ORPO_LAMBDA 0.25 "" "weight of the odds-ratio term (objective.orpo_lambda)"
setting STEPS 1000 3 "optimizer steps"
setting LR 1.2e-5 "" "peak learning rate"
setting MIN_LR 1.2e-6 "" "final learning rate"
setting WARMUP 50 1 "warmup steps"
setting PREF_DATA data/pref/pairs "" "space-separated preference dataset prefixes (python -m engine preprocess --kind preference)"
setting SFT_CKPT runs/sft_3b_b200/checkpoints/iter_0003000 "" "checkpoint whose weights ORPO starts from (checkpoint.init_from)"
setting SAVE_INTERVAL 200 0 "steps between checkpoints"
setting RUN_DIR runs/orpo_3b_b200 runs/orpo_3b_cpu_tiny "run directory"
finish_settings

overrides=(
  "model.preset=$PRESET" "objective.name=orpo" "objective.orpo_lambda=$ORPO_LAMBDA"
  "parallel.tensor=$TP"
  "data.paths=$(yaml_list "$PREF_DATA")" "data.seq_length=$SEQ"
  "training.global_batch_size=$PAIRS" "training.micro_batch_size=$MBS"
  "precision.dtype=$DTYPE"
  "checkpoint.init_from=$SFT_CKPT"
)
launch_engine "${CONFIG:?}" "${overrides[@]}" "${COMMON_OVERRIDES[@]}" "$@"
