#!/usr/bin/env bash
# ORPO preference training of frankenstallm-3b on one node of 8 B200 GPUs from the SFT
# checkpoint: lambda 0.25, lr 1.2e-5, 128 preference pairs per step. Settings are
# overridable from the environment; extra arguments are dotted overrides for the engine.
#
#   SFT_CKPT=runs/sft_3b_b200/checkpoints/iter_0003000 PREF_DATA=data/pref/pairs \
#     bash launchers/orpo_3b_b200.sh
#   DRY_RUN=1 bash launchers/orpo_3b_b200.sh
#   CPU_TINY=1 bash launchers/orpo_3b_b200.sh    # tiny-llama, 2 CPU processes, data built from the sample
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
setting ORPO_LAMBDA 0.25 "" "weight of the odds-ratio term (objective.orpo.weight)"
setting STEPS 1000 3 "optimizer steps"
setting LR 1.2e-5 "" "peak learning rate"
setting MIN_LR 1.2e-6 "" "final learning rate"
setting WARMUP 50 1 "warmup steps"
setting TINY_DATA runs/cpu_tiny_post_training_data "" "CPU_TINY only: where the tiny tokenizer and datasets are built (once)"
setting PREF_DATA data/pref/pairs "$TINY_DATA/data/preference" "space-separated preference dataset prefixes (python -m engine preprocess --kind preference)"
setting SFT_CKPT runs/sft_3b_b200/checkpoints/iter_0003000 none "checkpoint whose weights ORPO starts from (checkpoint.init_from; none = random init)"
setting SAVE_INTERVAL 200 0 "steps between checkpoints"
setting RUN_DIR runs/orpo_3b_b200 runs/orpo_3b_cpu_tiny "run directory"
finish_settings
TINY_OVERRIDES=()
if [ "$RUN_MODE" = "tiny" ]; then
  tiny_post_training_data "$TINY_DATA" "$SEQ"
fi

overrides=(
  "model.preset=$PRESET" "objective.name=orpo" "objective.orpo.weight=$ORPO_LAMBDA"
  "parallel.tensor=$TP"
  "data.paths=$(yaml_list "$PREF_DATA")" "data.seq_length=$SEQ"
  "training.global_batch_size=$PAIRS" "training.micro_batch_size=$MBS"
  "precision.dtype=$DTYPE"
)
if [ "$SFT_CKPT" != "none" ]; then
  overrides+=("checkpoint.init_from=$SFT_CKPT")
fi
launch_engine "${CONFIG:?}" "${overrides[@]}" "${TINY_OVERRIDES[@]}" "${COMMON_OVERRIDES[@]}" "$@"
