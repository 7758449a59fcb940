#!/usr/bin/env bash
# Per-rank wrapper: `bash launchers/task_env.sh COMMAND...` (used by every launcher, under
# torchrun and under srun).
#  - Under srun (one task per GPU) it maps SLURM's task variables onto torch.distributed's:
#    RANK=SLURM_PROCID, LOCAL_RANK=SLURM_LOCALID, WORLD_SIZE=SLURM_NTASKS (torchrun sets
#    them itself; values already set are kept).
#  - With NUMA_BIND=1 (default) and numactl + nvidia-smi present it runs the rank on the CPU
#    cores and memory of the NUMA node its GPU hangs off (from the GPU's PCI address in
#    /sys), so host-side work (data loading, kernel launches, pinned copies) never crosses
#    the socket interconnect. Otherwise the command runs unbound.
set -euo pipefail

if [ -n "${SLURM_PROCID:-}" ] && [ -z "${RANK:-}" ]; then
  export RANK="$SLURM_PROCID" LOCAL_RANK="${SLURM_LOCALID:-0}" WORLD_SIZE="${SLURM_NTASKS:-1}"
fi
local_rank="${LOCAL_RANK:-0}"

numa_node=""
if [ "${NUMA_BIND:-1}" = "1" ] && command -v numactl >/dev/null 2>&1 && command -v nvidia-smi >/dev/null 2>&1; then
  # The GPU this rank uses: the LOCAL_RANK-th visible device.
  gpu="$local_rank"
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    IFS=, read -r -a visible <<<"$CUDA_VISIBLE_DEVICES"
    gpu="${visible[$local_rank]:-$local_rank}"
  fi
  bus_id="$(nvidia-smi --query-gpu=pci.bus_id --format=csv,noheader -i "$gpu" 2>/dev/null | head -n 1 || true)"
  if [ -n "$bus_id" ]; then
    # nvidia-smi prints 00000000:18:00.0; sysfs names it 0000:18:00.0 in lower case.
    sys_id="$(echo "${bus_id: -12}" | tr '[:upper:]' '[:lower:]')"
    numa_node="$(cat "/sys/bus/pci/devices/$sys_id/numa_node" 2>/dev/null || true)"
  fi
fi

if [ -n "$numa_node" ] && [ "$numa_node" -ge 0 ]; then
  exec numactl "--cpunodebind=$numa_node" "--membind=$numa_node" "$@"
fi
exec "$@"
