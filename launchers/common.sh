# shellcheck shell=bash
# Shared logic of the launchers (sourced, never run): settings with printed defaults, the
# GPU/DRY_RUN/CPU_TINY decision, NCCL settings for NVLink/NVSwitch nodes, and the two ways
# of starting ranks:
#
#   local (one node):  torchrun --standalone, one worker per GPU
#   slurm (sbatch):    srun, one task per GPU (no torchrun). Chosen because SLURM then
#                      delivers its signals (--signal=USR1@120, SIGTERM on preemption) to
#                      every rank itself, and each rank's exit code (75 = "requeue me")
#                      reaches the batch script unchanged; torchrun's agent would swallow
#                      SIGUSR1 and replace the workers' exit code with its own.
#
# Every rank runs through launchers/task_env.sh, which maps SLURM's task variables onto
# torch.distributed's (RANK, LOCAL_RANK, WORLD_SIZE) and binds the rank to its GPU's NUMA node.
#
# Modes: DRY_RUN=1 prints the resolved command lines and config and exits 0 (no GPU
# needed); CPU_TINY=1 runs the launcher's tiny CPU variant (2 processes over gloo, a tiny
# preset, mock tokens); otherwise GPUs are required.

LAUNCHERS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="${REPO:-$(cd "$LAUNCHERS_DIR/.." && pwd)}"
PREEMPT_EXIT_CODE=75   # engine preemption.exit_code default: EX_TEMPFAIL, "try again later"
_SETTINGS=()

# setting NAME DEFAULT [TINY_DEFAULT] [DESCRIPTION]: NAME keeps its environment value, else
# takes DEFAULT (TINY_DEFAULT under CPU_TINY=1 when given). Recorded for print_settings.
setting() {
  local name="$1" default="$2" tiny="${3:-}" what="${4:-}" origin="default"
  if [ "${CPU_TINY:-0}" = "1" ] && [ -n "$tiny" ]; then
    default="$tiny"
  fi
  if [ -n "${!name+x}" ]; then
    origin="environment"
  else
    printf -v "$name" '%s' "$default"
  fi
  export "${name?}"
  _SETTINGS+=("$(printf '%-22s %-40s # %s (%s)' "$name" "${!name}" "$what" "$origin")")
}

print_settings() {
  echo "[launch] $(basename "$0") settings (override any with NAME=value in the environment):"
  local line
  for line in "${_SETTINGS[@]}"; do
    echo "[launch]   $line"
  done
}

# Number of NVIDIA GPUs on this machine (0 without a driver).
gpu_count() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
  else
    echo 0
  fi
}

# Comma-joined YAML list for a dotted override: "a b" -> "[a,b]".
yaml_list() {
  local IFS=,
  # shellcheck disable=SC2048,SC2086
  set -- $*
  echo "[$*]"
}

# NCCL/PyTorch settings for NVLink + NVSwitch nodes (HGX/DGX B200, H100, H200). Each one is
# overridable from the environment.
nccl_env_nvswitch() {
  # NVLink SHARP: NVSwitch performs the reduction of all-reduces in the switch, halving the
  # NVLink traffic of the gradient reduction inside a node.
  export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-1}"
  # Keep intra-node traffic on NVLink peer-to-peer, never staged through host memory / PCIe.
  export NCCL_P2P_LEVEL="${NCCL_P2P_LEVEL:-NVL}"
  # One hardware work queue: kernels reach the GPU in launch order, which megatron-core's
  # communication/computation overlap (TP, sequence parallel) relies on.
  export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
  # Free the memory of asynchronous collectives when they complete instead of holding it
  # through recordStream until the allocator notices (lower peak memory).
  export TORCH_NCCL_AVOID_RECORD_STREAMS="${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}"
  # A failed or timed-out collective tears the process down instead of hanging the job
  # until its time limit (so a requeue can happen).
  export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
  # Warnings only: INFO prints the topology of every communicator of every rank.
  export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
}

# Decide how to run: sets RUN_MODE to dry|tiny|gpu, or exits with one line when impossible.
decide_mode() {
  if [ "${DRY_RUN:-0}" = "1" ]; then
    RUN_MODE=dry
  elif [ "${CPU_TINY:-0}" = "1" ]; then
    RUN_MODE=tiny
  elif [ "$(gpu_count)" -gt 0 ]; then
    RUN_MODE=gpu
  else
    echo "[launch] error: no NVIDIA GPU on $(hostname) (nvidia-smi lists none); DRY_RUN=1 prints the commands, CPU_TINY=1 runs the tiny CPU variant" >&2
    exit 1
  fi
}

# Print a command line the way a shell would read it back.
show_cmd() {
  local label="$1"
  shift
  printf '[launch] %s:' "$label"
  printf ' %q' "$@"
  printf '\n'
}

# Run "$@" in its own session and wait for it; SIGTERM, SIGUSR1 and SIGINT this shell receives
# (kill <launcher pid>, Ctrl-C, a scheduler signalling the job) are forwarded to it once, and
# the ranks finish their step, checkpoint and exit. Its own session: a signal sent to this
# shell's process group must not reach torchrun twice (directly and forwarded), because
# torchrun aborts its wait for the ranks on a second signal. Returns the command's exit code.
run_and_wait() {
  setsid "$@" &
  _CHILD_PID=$!
  # The job runs in its own session, so a launcher killed with -9 (no trap runs) would leave
  # it training unattended: a watcher forwards one TERM to it when this shell disappears.
  local launcher=$$ watcher
  (
    while kill -0 "$launcher" 2>/dev/null && kill -0 "$_CHILD_PID" 2>/dev/null; do sleep 1; done
    if kill -0 "$_CHILD_PID" 2>/dev/null; then kill -s TERM "$_CHILD_PID" 2>/dev/null || true; fi
  ) &
  watcher=$!
  local rc=0 sig
  for sig in TERM USR1 INT; do
    # shellcheck disable=SC2064  # the signal name is fixed now, on purpose
    trap "forward_signal $sig" "$sig"
  done
  while true; do
    rc=0
    wait "$_CHILD_PID" || rc=$?
    if ! kill -0 "$_CHILD_PID" 2>/dev/null; then
      break
    fi
  done
  trap - TERM USR1 INT
  kill "$watcher" 2>/dev/null || true
  return "$rc"
}

forward_signal() {
  echo "[launch] SIG$1 received: forwarded to $_CHILD_PID; waiting for the ranks to checkpoint and exit"
  kill -s "$1" "$_CHILD_PID" 2>/dev/null || true
}

# ranks_exit_code DIR NPROC RC: torchrun exits 1 whatever code its workers returned; every
# rank writes its own code into DIR (ENGINE_EXIT_CODE_DIR), so when all NPROC ranks stopped
# with the preemption code the launcher returns it too (75 = requeue), else RC.
ranks_exit_code() {
  local dir="$1" nproc="$2" rc="$3" r code
  if [ "$rc" -ne 0 ]; then
    for ((r = 0; r < nproc; r++)); do
      code="$(cat "$dir/rank$r" 2>/dev/null || true)"
      if [ "$code" != "$PREEMPT_EXIT_CODE" ]; then
        echo "$rc"
        return 0
      fi
    done
    rc="$PREEMPT_EXIT_CODE"
  fi
  echo "$rc"
}

# The resolved, validated config (python -m engine config ... --world-size N).
show_config() {
  local world="$1" config="$2"
  shift 2
  echo "[launch] resolved config (python -m engine config --world-size $world):"
  (cd "$REPO" && "$PYTHON" -m engine config "$config" "$@" --world-size "$world")
}

# launch_engine CONFIG OVERRIDES...: start `python -m engine train` on this node (torchrun)
# or, under LAUNCH_MODE=slurm, on every GPU of the allocation (srun).
launch_engine() {
  local config="$1"
  shift
  if [ "${LAUNCH_MODE:-local}" = "slurm" ]; then
    launch_slurm "$config" "$@"
  else
    launch_local "$config" "$@"
  fi
}

launch_local() {
  local config="$1"
  shift
  local nproc="$GPUS_PER_NODE"
  local cmd=("$PYTHON" -m torch.distributed.run --standalone --nnodes=1 "--nproc-per-node=$nproc")
  if [ "$RUN_MODE" != "tiny" ]; then
    # Give the ranks time to finish a step and checkpoint after torchrun forwards a signal
    # (torch >= 2.6 has the option; older torchrun SIGKILLs them after 30 s).
    if "$PYTHON" -m torch.distributed.run --help 2>/dev/null | grep -q -- --shutdown-timeout; then
      cmd+=("--shutdown-timeout=$SHUTDOWN_TIMEOUT")
    fi
    nccl_env_nvswitch
  fi
  # torchrun forwards these to the ranks; SIGUSR1 (SLURM's time-limit warning) is not in
  # its default list, and unhandled it would kill torchrun and orphan the ranks.
  export TORCHELASTIC_SIGNALS_TO_HANDLE="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
  cmd+=(--no-python bash "$LAUNCHERS_DIR/task_env.sh" "$PYTHON" -m engine train "$config" "$@")
  echo "[launch] mode $RUN_MODE: 1 node x $nproc ranks (torchrun --standalone)"
  show_cmd "torchrun command" "${cmd[@]}"
  if [ "$RUN_MODE" = "dry" ]; then
    show_config "$nproc" "$config" "$@"
    return 0
  fi
  cd "$REPO" || return 1
  local rc=0 codes
  codes="$(mktemp -d)"
  export ENGINE_EXIT_CODE_DIR="$codes"
  run_and_wait "${cmd[@]}" || rc=$?
  rc="$(ranks_exit_code "$codes" "$nproc" "$rc")"
  rm -rf "$codes"
  if [ "$rc" -eq "$PREEMPT_EXIT_CODE" ]; then
    echo "[launch] ranks exited $rc (stopped by a signal, checkpoint written): rerun to resume"
  fi
  return "$rc"
}

# Rendezvous of a SLURM allocation: MASTER_ADDR (first host), MASTER_PORT (from the job id,
# so two jobs sharing a node do not collide), NNODES, NODE_RANK, WORLD_SIZE.
slurm_rendezvous() {
  : "${SLURM_JOB_NODELIST:?not inside a SLURM allocation (SLURM_JOB_NODELIST is unset)}"
  local hosts
  # Whole output first: `| head -n 1` could SIGPIPE scontrol, which pipefail turns into a failure.
  hosts="$(scontrol show hostnames "$SLURM_JOB_NODELIST")"
  MASTER_ADDR="${hosts%%$'\n'*}"
  MASTER_PORT="${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"
  NNODES="${SLURM_NNODES:?SLURM_NNODES is unset}"
  NODE_RANK="${SLURM_NODEID:-0}"
  WORLD_SIZE=$((NNODES * GPUS_PER_NODE))
  export MASTER_ADDR MASTER_PORT WORLD_SIZE
}

launch_slurm() {
  local config="$1"
  shift
  slurm_rendezvous
  local cmd=(srun --kill-on-bad-exit=0 --label "--nodes=$NNODES" "--ntasks-per-node=$GPUS_PER_NODE"
             "--ntasks=$WORLD_SIZE" bash "$LAUNCHERS_DIR/task_env.sh" "$PYTHON" -m engine train "$config" "$@")
  echo "[launch] mode $RUN_MODE: SLURM job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}), one srun task per GPU"
  echo "[launch] rendezvous: MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT NNODES=$NNODES NODE_RANK=$NODE_RANK WORLD_SIZE=$WORLD_SIZE"
  show_cmd "srun command" "${cmd[@]}"
  if [ "$RUN_MODE" = "dry" ]; then
    show_config "$WORLD_SIZE" "$config" "$@"
    return 0
  fi
  nccl_env_nvswitch
  cd "$REPO" || return 1
  local rc=0
  run_and_wait "${cmd[@]}" || rc=$?
  if [ "$rc" -eq "$PREEMPT_EXIT_CODE" ]; then
    # The ranks checkpointed after a signal: queue this job again; it resumes from the
    # newest complete checkpoint (checkpoint.resume=true).
    echo "[launch] ranks exited $rc (stopped by a signal, checkpoint written): scontrol requeue ${SLURM_JOB_ID}"
    scontrol requeue "$SLURM_JOB_ID"
    return 0
  fi
  return "$rc"
}

# Overrides common to every launcher: run directory, auto-resume, profiling window.
common_overrides() {
  # Length, schedule and bookkeeping settings every launcher declares (with its own defaults).
  COMMON_OVERRIDES=("training.steps=$STEPS" "optimizer.lr=$LR" "optimizer.min_lr=$MIN_LR"
                    "schedule.warmup_steps=$WARMUP" "checkpoint.save_interval=$SAVE_INTERVAL"
                    "logging.interval=$LOG_INTERVAL"
                    "checkpoint.dir=$RUN_DIR" "checkpoint.resume=$RESUME")
  if [ -n "${PROFILE_START:-}" ]; then
    COMMON_OVERRIDES+=("profile.start_step=$PROFILE_START" "profile.end_step=${PROFILE_END:-$PROFILE_START}"
                       "profile.ranks=[${PROFILE_RANKS:-0}]")
  fi
  if [ "${TORCH_PROFILER:-0}" = "1" ]; then
    COMMON_OVERRIDES+=("profile.torch_profiler=true")
  fi
  if [ "$RUN_MODE" = "tiny" ]; then
    COMMON_OVERRIDES+=("parallel.backend=gloo" "logging.tensorboard=false")
  fi
}

# Pretraining data of a launcher: DATA_PATHS, or random tokens with DATA_MOCK=1 (the tiny
# CPU variant's default); the matching overrides go to DATA_OVERRIDES.
pretrain_data_settings() {
  setting DATA_PATHS data/pretrain/ko_en_text_document "" "space-separated dataset prefixes (.bin/.idx)"
  setting DATA_MOCK 0 1 "1 = random tokens instead of DATA_PATHS"
  # shellcheck disable=SC2034  # read by the launcher that sources this file
  if [ "$DATA_MOCK" = "1" ]; then
    DATA_OVERRIDES=("data.mock=true")
  else
    DATA_OVERRIDES=("data.paths=$(yaml_list "$DATA_PATHS")")
  fi
}

# The settings every launcher has, then the printout of all of them and COMMON_OVERRIDES;
# call after the launcher's own settings.
finish_settings() {
  setting GPUS_PER_NODE 8 2 "ranks per node (one per GPU)"
  setting LOG_INTERVAL 10 1 "steps between log lines"
  setting CONFIG launchers/configs/base.yaml "" "base YAML the overrides apply to"
  setting PYTHON python "" "Python with the engine installed"
  setting RESUME true "" "resume from the newest complete checkpoint in RUN_DIR (fresh start if none)"
  setting SHUTDOWN_TIMEOUT 600 "" "seconds torchrun waits for ranks to checkpoint after a signal"
  print_settings
  common_overrides
}

# tiny_post_training_data DIR SEQ (CPU_TINY=1 of the SFT and ORPO launchers): build once in DIR,
# from the bundled sample, a 1000-piece tokenizer (padded to 1024), pretraining data, and SFT
# and preference data (examples/make_post_training_data.py), tokenized at SEQ; the launchers
# then need neither the GPU run's data nor its checkpoints. Sets TINY_OVERRIDES.
tiny_post_training_data() {
  local dir="$1" seq="$2"
  case "$dir" in /*) ;; *) dir="$REPO/$dir" ;; esac
  if [ ! -f "$dir/complete-seq$seq" ]; then
    echo "[launch] CPU_TINY: building the tiny tokenizer and datasets in $dir"
    (cd "$REPO" &&
      "$PYTHON" -m engine tokenizer train --input examples/data/sample.jsonl --output-dir "$dir/tokenizer" \
        --vocab-size 1000 >/dev/null &&
      "$PYTHON" -m engine preprocess --input examples/data/sample.jsonl --tokenizer "$dir/tokenizer" \
        --output-prefix "$dir/data/pretrain" --no-progress >/dev/null &&
      "$PYTHON" examples/make_post_training_data.py --out-dir "$dir/raw" --max-chars 60 >/dev/null &&
      "$PYTHON" -m engine preprocess --kind sft --input "$dir/raw/sft.jsonl" --tokenizer "$dir/tokenizer" \
        --output-prefix "$dir/data/sft" --seq-length "$seq" --no-progress >/dev/null &&
      "$PYTHON" -m engine preprocess --kind preference --input "$dir/raw/preference.jsonl" \
        --tokenizer "$dir/tokenizer" --output-prefix "$dir/data/preference" --seq-length "$seq" \
        --no-progress >/dev/null) || return 1
    touch "$dir/complete-seq$seq"
  fi
  # shellcheck disable=SC2034  # read by the launcher that sources this file
  TINY_OVERRIDES=("data.tokenizer=$dir/tokenizer" "model.vocab_size=1024")
}
