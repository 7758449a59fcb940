#!/usr/bin/env bash
# Supervised fine-tuning of frankenstallm-3b on one node of 8 B200 GPUs, starting from a
# pretraining checkpoint, with 30% of the training tokens replayed from the pretraining
# data (deterministic mixing, realised share logged). Settings are overridable from the
# environment; extra arguments are dotted overrides for the engine.
#
#   PRETRAIN_CKPT=runs/pretrain_3b_b200/checkpoints/iter_0100000 SFT_DATA=data/sft/chat \
#     bash launchers/sft_3b_b200.sh
#   DRY_RUN=1 bash launchers/sft_3b_b200.sh
#   CPU_TINY=1 bash launchers/sft_3b_b200.sh     # tiny-llama, 2 CPU processes, data built from the sample
set -euo pipefail
# shellcheck source=launchers/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
decide_mode

setting PRESET frankenstallm-3b tiny-llama "model preset"
setting TP 1 "" "tensor-parallel size"
setting SEQ 4096 64 "sequence length (packed conversations)"
setting GBS 128 4 "global batch in sequences"
setting MBS 2 1 "micro-batch per GPU"
setting DTYPE bf16 fp32 "precision.dtype (fine-tuning at lr ~1e-5 stays in bf16; fp8 works too)"
setting STEPS 3000 3 "optimizer steps"
setting LR 2e-5 "" "peak learning rate"
setting MIN_LR 2e-6 "" "final learning rate"
setting WARMUP 100 1 "warmup steps"
setting TINY_DATA runs/cpu_tiny_post_training_data "" "CPU_TINY only: where the tiny tokenizer and datasets are built (once)"
setting SFT_DATA data/sft/chat "$TINY_DATA/data/sft" "space-separated SFT dataset prefixes (python -m engine preprocess --kind sft)"
setting REPLAY_PATHS data/pretrain/ko_en_text_document "$TINY_DATA/data/pretrain" "space-separated pretraining prefixes replayed during SFT"
setting REPLAY_RATIO 0.3 "" "share of replayed pretraining data (data.replay_ratio)"
setting REPLAY_BY tokens "" "what the ratio counts: tokens or samples (data.replay_by)"
setting PRETRAIN_CKPT runs/pretrain_3b_b200/checkpoints/iter_0100000 none "checkpoint whose weights SFT starts from (checkpoint.init_from; none = random init)"
setting SAVE_INTERVAL 500 0 "steps between checkpoints"
setting RUN_DIR runs/sft_3b_b200 runs/sft_3b_cpu_tiny "run directory"
finish_settings
TINY_OVERRIDES=()
if [ "$RUN_MODE" = "tiny" ]; then
  tiny_post_training_data "$TINY_DATA" "$SEQ"
fi

overrides=(
  "model.preset=$PRESET" "objective.name=sft"
  "parallel.tensor=$TP"
  "data.paths=$(yaml_list "$SFT_DATA")" "data.seq_length=$SEQ"
  "data.replay_paths=$(yaml_list "$REPLAY_PATHS")" "data.replay_ratio=$REPLAY_RATIO" "data.replay_by=$REPLAY_BY"
  "training.global_batch_size=$GBS" "training.micro_batch_size=$MBS"
  "precision.dtype=$DTYPE"
)
if [ "$PRETRAIN_CKPT" != "none" ]; then
  overrides+=("checkpoint.init_from=$PRETRAIN_CKPT")
fi
launch_engine "${CONFIG:?}" "${overrides[@]}" "${TINY_OVERRIDES[@]}" "${COMMON_OVERRIDES[@]}" "$@"
