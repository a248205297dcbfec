# Shard processes over the visible GPUs (or CPU processes), for evaluate.sh and evaluate_I4.sh (`source` it).
#
#   split_args ARGS...                         POS = the arguments before "--", EXTRA = those after it
#   shards_init NSHARDS_OR_EMPTY CPU_DEFAULT   sets GPUS, NGPU, NSHARDS (default: #GPUs, else CPU_DEFAULT), THREADS
#   shard_launch I LOG CMD...                  CMD in the background with shard I's device appended (GPU I mod #GPUs
#                                              as cuda:0 of its own CUDA_VISIBLE_DEVICES, else a CPU share of the
#                                              cores), output to LOG
#   shards_wait LABEL                          waits for every launched shard; names each failed one with the end
#                                              of its log; returns 1 if any failed
# Ctrl-C / kill stops every launched shard.

split_args() {
  POS=()
  while [[ $# -gt 0 && "$1" != "--" ]]; do
    POS+=("$1")
    shift
  done
  if [[ "${1:-}" == "--" ]]; then shift; fi
  EXTRA=("$@")
}

SHARD_PIDS=()
SHARD_LOGS=()

shards_init() {
  local requested=$1 cpu_default=$2
  GPUS=()
  if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    IFS=',' read -r -a GPUS <<< "$CUDA_VISIBLE_DEVICES"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    mapfile -t GPUS < <(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | tr -d ' ')
  fi
  NGPU=${#GPUS[@]}
  NSHARDS=${requested:-$(( NGPU > 0 ? NGPU : cpu_default ))}
  if ! [[ "$NSHARDS" =~ ^[1-9][0-9]*$ ]]; then
    echo "NSHARDS must be a positive integer, got '$NSHARDS'" >&2
    exit 2
  fi
  local cores; cores=$(nproc 2>/dev/null || echo 2)
  THREADS=$(( cores / NSHARDS > 0 ? cores / NSHARDS : 1 ))
  trap shards_stop INT TERM
}

shards_stop() {
  trap - INT TERM
  echo "stopping ${#SHARD_PIDS[@]} shard process(es)" >&2
  local pid
  for pid in "${SHARD_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  wait
  exit 130
}

shard_launch() {
  local i=$1 log=$2; shift 2
  if (( NGPU > 0 )); then
    CUDA_VISIBLE_DEVICES="${GPUS[$(( i % NGPU ))]}" "$@" --device cuda:0 > "$log" 2>&1 &
  else
    OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS CUDA_VISIBLE_DEVICES="" "$@" --device cpu > "$log" 2>&1 &
  fi
  SHARD_PIDS+=($!)
  SHARD_LOGS+=("$log")
}

shards_wait() {
  local label=$1 failed=0 i
  for (( i = 0; i < ${#SHARD_PIDS[@]}; i++ )); do
    if ! wait "${SHARD_PIDS[$i]}"; then
      failed=1
      echo "[$label] shard $i/${#SHARD_PIDS[@]} failed; last lines of ${SHARD_LOGS[$i]}:" >&2
      tail -n 15 "${SHARD_LOGS[$i]}" >&2
    fi
  done
  SHARD_PIDS=()
  SHARD_LOGS=()
  return $failed
}
