#!/usr/bin/env bash
# Knowledge distillation on one node of 8 B200 GPUs: a trained frankenstallm-3b (the teacher,
# frozen, forward only) into a 14-layer, hidden-2048 student of the same family and tokenizer
# (~0.8B parameters) on the pretraining data, through nvidia-modelopt (objective distill: logit
# KL at a temperature; KD loss alone by default, or LM loss + KD with KD_SCALE). The teacher is
# built at the student's layout from its own config.yaml and loaded from its checkpoint (any
# layout it was saved at); it is never written into the student's checkpoints. Needs the [opt]
# extra (pip install -e .[opt]). Every setting below can be overridden from the environment;
# extra arguments are passed to the engine as dotted overrides.
#
#   TEACHER_CKPT=runs/pretrain_3b_b200 bash launchers/distill_b200.sh
#   DRY_RUN=1 bash launchers/distill_b200.sh       # print commands + resolved config
#   CPU_TINY=1 bash launchers/distill_b200.sh      # tiny-llama teacher (trained here once) into a
#                                                  # 2-layer student, 2 CPU processes
set -euo pipefail
# shellcheck source=launchers/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
decide_mode

setting PRESET frankenstallm-3b tiny-llama "student's base preset (the teacher's architecture comes from its checkpoint)"
setting STUDENT_LAYERS 14 2 "student model.num_layers"
setting STUDENT_HIDDEN 2048 32 "student model.hidden_size"
setting STUDENT_HEADS 16 4 "student model.num_attention_heads"
setting STUDENT_GROUPS 8 2 "student model.num_query_groups"
setting STUDENT_FFN 5632 96 "student model.ffn_hidden_size"
setting TP 1 "" "tensor-parallel size (teacher and student alike)"
setting PP 1 "" "pipeline-parallel size (non-interleaved only)"
setting SEQ 4096 64 "sequence length"
setting GBS 256 4 "global batch in sequences (256 x 4096 = 1,048,576 tokens)"
setting MBS 2 1 "micro-batch per GPU"
setting DTYPE bf16 fp32 "precision.dtype (student and teacher)"
setting STEPS 20000 3 "optimizer steps"
setting LR 3e-4 3e-3 "peak learning rate"
setting MIN_LR 3e-5 3e-4 "final learning rate"
setting WARMUP 500 1 "warmup steps"
setting TEMPERATURE 1.0 "" "objective.distill.logit_kl_temperature"
setting SKIP_LM_LOSS true "" "train on the KD loss alone (false: LM loss + KD_SCALE x KD loss)"
setting KD_SCALE 1.0 "" "objective.distill.kd_loss_scale (with SKIP_LM_LOSS=false)"
setting TINY_DATA runs/cpu_tiny_post_training_data "" "CPU_TINY only: where the tiny tokenizer, data and teacher are built (once)"
setting TEACHER_CKPT runs/pretrain_3b_b200 "$TINY_DATA/teacher" "teacher: a checkpoint or a run directory (its newest checkpoint)"
setting DATA_PATHS data/pretrain/ko_en_text_document "$TINY_DATA/data/pretrain" "space-separated pretraining prefixes"
setting SAVE_INTERVAL 1000 0 "steps between checkpoints"
setting RUN_DIR runs/distill_3b_b200 runs/distill_3b_cpu_tiny "run directory"
finish_settings
TINY_OVERRIDES=()
if [ "$RUN_MODE" = "tiny" ]; then
  tiny_post_training_data "$TINY_DATA" "$SEQ"
  teacher_dir="$TEACHER_CKPT"
  case "$teacher_dir" in /*) ;; *) teacher_dir="$REPO/$teacher_dir" ;; esac
  if ! compgen -G "$teacher_dir/checkpoints/iter_*/engine_meta.json" >/dev/null; then
    echo "[launch] CPU_TINY: training the tiny teacher (tiny-llama, 3 steps) in $teacher_dir"
    (cd "$REPO" &&
      "$PYTHON" -m engine train "${CONFIG:?}" "model.preset=tiny-llama" "data.paths=[$TINY_DATA/data/pretrain]" \
        "data.seq_length=$SEQ" "training.steps=3" "training.global_batch_size=4" "training.micro_batch_size=1" \
        "precision.dtype=fp32" "checkpoint.dir=$teacher_dir" "logging.tensorboard=false" \
        "${TINY_OVERRIDES[@]}" >/dev/null) || exit 1
  fi
fi

overrides=(
  "model.preset=$PRESET" "model.num_layers=$STUDENT_LAYERS" "model.hidden_size=$STUDENT_HIDDEN"
  "model.num_attention_heads=$STUDENT_HEADS" "model.num_query_groups=$STUDENT_GROUPS"
  "model.ffn_hidden_size=$STUDENT_FFN"
  "objective.name=distill" "objective.distill.teacher=$TEACHER_CKPT"
  "objective.distill.logit_kl_temperature=$TEMPERATURE" "objective.distill.skip_lm_loss=$SKIP_LM_LOSS"
  "objective.distill.kd_loss_scale=$KD_SCALE"
  "parallel.tensor=$TP" "parallel.pipeline=$PP"
  "data.paths=$(yaml_list "$DATA_PATHS")" "data.seq_length=$SEQ"
  "training.global_batch_size=$GBS" "training.micro_batch_size=$MBS"
  "precision.dtype=$DTYPE"
)
launch_engine "${CONFIG:?}" "${overrides[@]}" "${TINY_OVERRIDES[@]}" "${COMMON_OVERRIDES[@]}" "$@"
