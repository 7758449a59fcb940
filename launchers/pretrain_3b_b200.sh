#!/usr/bin/env bash
# Pretrain frankenstallm-3b on one node of 8 B200 GPUs: MXFP8 GEMMs (TransformerEngine),
# sequence 4096, 256 sequences = 1,048,576 tokens per step, distributed optimizer, one
# rank per GPU bound to its NUMA node. Every setting below can be overridden from the
# environment; extra arguments are passed to the engine as dotted overrides.
#
#   bash launchers/pretrain_3b_b200.sh                      # on the GPU node
#   DRY_RUN=1 bash launchers/pretrain_3b_b200.sh            # print commands + resolved config
#   CPU_TINY=1 bash launchers/pretrain_3b_b200.sh           # tiny-llama, 2 CPU processes
#   sbatch launchers/slurm/pretrain_3b.sbatch               # several nodes
set -euo pipefail
# shellcheck source=launchers/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
decide_mode

setting PRESET frankenstallm-3b tiny-llama "model preset"
setting TP 1 "" "tensor-parallel size"
setting PP 1 "" "pipeline-parallel size"
setting SEQ 4096 64 "sequence length"
setting GBS 256 4 "global batch in sequences (256 x 4096 = 1,048,576 tokens)"
setting MBS 4 1 "micro-batch per GPU (python -m engine plan: ~79 GiB per B200)"
setting DTYPE fp8 fp32 "precision.dtype"
setting FP8_RECIPE mxfp8 auto "precision.fp8_recipe (MXFP8 needs Blackwell)"
setting DIST_OPT true "" "distributed optimizer (optimizer state sharded over data-parallel ranks)"
setting RECOMPUTE none "" "activation recompute: none, selective, full"
setting STEPS 100000 3 "optimizer steps"
setting LR 1.5e-4 "" "peak learning rate"
setting MIN_LR 1.5e-5 "" "final learning rate"
setting WARMUP 2000 1 "warmup steps"
pretrain_data_settings
setting SAVE_INTERVAL 1000 0 "steps between checkpoints"
setting RUN_DIR runs/pretrain_3b_b200 runs/pretrain_3b_cpu_tiny "run directory (checkpoints, logs)"
finish_settings

overrides=(
  "model.preset=$PRESET"
  "parallel.tensor=$TP" "parallel.pipeline=$PP" "parallel.distributed_optimizer=$DIST_OPT"
  "data.seq_length=$SEQ"
  "training.global_batch_size=$GBS" "training.micro_batch_size=$MBS"
  "training.recompute=$RECOMPUTE"
  "precision.dtype=$DTYPE" "precision.fp8_recipe=$FP8_RECIPE"
)

launch_engine "${CONFIG:?}" "${overrides[@]}" "${DATA_OVERRIDES[@]}" "${COMMON_OVERRIDES[@]}" "$@"
