#!/usr/bin/env bash
# Evaluate one model on BISON, NLVR2 and/or SparklesEval: shard each dataset over the GPUs (or over CPU
# processes), wait for the shards, then merge them. Finished items are kept, so running the same command
# again after an interruption continues where it stopped.
#
#   bash evaluate.sh [ROOT] [CFG] [DATASETS] [NSHARDS] [-- extra evaluate.py arguments]
#
#   ROOT      Sparkles root (default: $SPARKLES_ROOT)
#   CFG       model config (default: eval_configs/sparkles_eval.yaml); "none" judges SparklesEval's GPT-4
#             reference dialogues instead of a model
#   DATASETS  comma- or space-separated subset of BISON,NLVR2,SparklesEval (default: all three)
#   NSHARDS   number of shard processes per dataset (default: number of GPUs, or 2 on CPU)
#
# GPUs: the visible ones (CUDA_VISIBLE_DEVICES, else nvidia-smi); shard i runs on GPU i mod #GPUs.
# Without GPUs every shard is a CPU process with its share of the cores (OMP_NUM_THREADS).
# Extra arguments after "--" go to every evaluate.py call, e.g.
#   bash evaluate.sh /data/Sparkles eval_configs/sparkles_eval.yaml "BISON NLVR2 SparklesEval" 8 -- --protocol upstream
#   bash evaluate.sh /data/Sparkles eval_configs/sparkles_eval.yaml BISON 8 -- --protocol upstream \
#       --protocol-file protocol_upstream.yaml      (the original's texts: python -m sparkles.tools.import_protocol)
#   bash evaluate.sh outputs/tiny eval_configs/sparkles_tiny.yaml SparklesEval 2 -- --judge_models reference
# Environment: PYTHON (default python), EVAL_LOG_DIR (default <ROOT>/evaluation/logs).
set -uo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"  # paths given by the user stay relative to the caller's directory
source "$HERE/scripts/shards.sh"
split_args "$@"
if [[ ${#POS[@]} -gt 4 ]]; then
  echo "evaluate.sh: at most 4 positional arguments (ROOT CFG DATASETS NSHARDS); put evaluate.py flags after --" >&2
  exit 2
fi
ROOT="${POS[0]:-${SPARKLES_ROOT:-}}"
CFG="${POS[1]:-$HERE/eval_configs/sparkles_eval.yaml}"
DATASETS="${POS[2]:-BISON,NLVR2,SparklesEval}"
NSHARDS="${POS[3]:-}"
PYTHON="${PYTHON:-python}"

if [[ -z "$ROOT" ]]; then
  echo "usage: bash evaluate.sh ROOT [CFG] [DATASETS] [NSHARDS] [-- evaluate.py args]  (or set SPARKLES_ROOT)" >&2
  exit 2
fi

# shards over the GPUs, or 2 CPU processes with their share of the cores
shards_init "$NSHARDS" 2

CFG_ARGS=(--cfg-path "$CFG")
if [[ "$CFG" == "none" ]]; then
  CFG_ARGS=()
fi

LOG_DIR="${EVAL_LOG_DIR:-$ROOT/evaluation/logs}"
mkdir -p "$LOG_DIR"

fmt_time() { printf '%dm%02ds' $(( $1 / 60 )) $(( $1 % 60 )); }

STATUS=0
T_ALL=$SECONDS
for DATASET in ${DATASETS//,/ }; do
  T0=$SECONDS
  if [[ "$CFG" == "none" && "$DATASET" != "SparklesEval" ]]; then
    echo "[$DATASET] skipped: without a model config only SparklesEval's reference dialogues are judged"
    continue
  fi
  echo "[$DATASET] $NSHARDS shard(s) on $([[ $NGPU -gt 0 ]] && echo "GPUs ${GPUS[*]}" || echo "CPU, $THREADS thread(s) each")"
  for (( i = 0; i < NSHARDS; i++ )); do
    shard_launch "$i" "$LOG_DIR/${DATASET}_shard${i}of${NSHARDS}.log" "$PYTHON" "$HERE/evaluate.py" \
      --sparkles_root "$ROOT" "${CFG_ARGS[@]}" --dataset "$DATASET" --shard "$i/$NSHARDS" --inference --no-progress \
      "${EXTRA[@]}"
  done
  FAILED=0
  shards_wait "$DATASET" || FAILED=1
  echo "[$DATASET] shards finished in $(fmt_time $(( SECONDS - T0 )))"
  if [[ $FAILED -ne 0 ]]; then
    echo "[$DATASET] not merged: fix the error above and run the same command again (finished items are kept)" >&2
    STATUS=1
    continue
  fi
  if ! "$PYTHON" "$HERE/evaluate.py" --sparkles_root "$ROOT" "${CFG_ARGS[@]}" --dataset "$DATASET" --merge-results \
       "${EXTRA[@]}"; then
    STATUS=1
  fi
  echo "[$DATASET] wall time $(fmt_time $(( SECONDS - T0 )))"
done
echo "evaluate.sh: total wall time $(fmt_time $(( SECONDS - T_ALL )))"
exit $STATUS
