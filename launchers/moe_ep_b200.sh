#!/usr/bin/env bash
# Pretrain keural-moe-15b (8 experts, top-2) on one node of 8 B200 GPUs with expert
# parallelism 8 (one expert per GPU), the all-to-all token dispatcher, grouped-GEMM experts
# when TransformerEngine is installed, and auxiliary-loss load balancing. Settings are
# overridable from the environment; extra arguments are dotted overrides for the engine.
#
#   bash launchers/moe_ep_b200.sh
#   DRY_RUN=1 bash launchers/moe_ep_b200.sh
#   CPU_TINY=1 bash launchers/moe_ep_b200.sh      # tiny-moe, EP=2 over 2 CPU processes
set -euo pipefail
# shellcheck source=launchers/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
decide_mode

# Grouped GEMM experts need TransformerEngine's kernels; without TE the sequential experts run.
te_default=false
if [ "$RUN_MODE" = "gpu" ] && "${PYTHON:-python}" -c "import transformer_engine.pytorch" >/dev/null 2>&1; then
  te_default=true
fi

setting PRESET keural-moe-15b tiny-moe "model preset"
setting EP 8 2 "expert-parallel size"
setting TP 1 "" "tensor-parallel size"
setting SEQ 4096 64 "sequence length"
setting GBS 128 4 "global batch in sequences (128 x 4096 = 524,288 tokens)"
setting MBS 1 "" "micro-batch per GPU"
setting DISPATCHER alltoall "" "MoE token dispatcher (model.moe_token_dispatcher)"
setting GROUPED_GEMM "$te_default" false "grouped-GEMM experts (true when TransformerEngine imports)"
setting AUX_LOSS 1e-2 "" "load-balancing auxiliary loss coefficient (model.moe_aux_loss_coeff)"
setting DTYPE bf16 fp32 "precision.dtype"
setting FP8_RECIPE auto "" "precision.fp8_recipe when DTYPE=fp8"
setting DIST_OPT true "" "distributed optimizer"
setting RECOMPUTE none "" "activation recompute: none, selective, full"
setting STEPS 100000 3 "optimizer steps"
setting LR 3e-4 "" "peak learning rate"
setting MIN_LR 3e-5 "" "final learning rate"
setting WARMUP 2000 1 "warmup steps"
pretrain_data_settings
setting SAVE_INTERVAL 1000 0 "steps between checkpoints"
setting RUN_DIR runs/moe_ep_b200 runs/moe_ep_cpu_tiny "run directory"
finish_settings

overrides=(
  "model.preset=$PRESET"
  "model.moe_token_dispatcher=$DISPATCHER" "model.moe_grouped_gemm=$GROUPED_GEMM" "model.moe_aux_loss_coeff=$AUX_LOSS"
  "parallel.expert=$EP" "parallel.tensor=$TP" "parallel.distributed_optimizer=$DIST_OPT"
  "data.seq_length=$SEQ"
  "training.global_batch_size=$GBS" "training.micro_batch_size=$MBS"
  "training.recompute=$RECOMPUTE"
  "precision.dtype=$DTYPE" "precision.fp8_recipe=$FP8_RECIPE"
)
launch_engine "${CONFIG:?}" "${overrides[@]}" "${DATA_OVERRIDES[@]}" "${COMMON_OVERRIDES[@]}" "$@"
