#!/usr/bin/env bash
# Answer I4 (DEMON core) datasets with one model, sharded over the GPUs (or CPU processes), then score them.
# Finished answers are kept, so running the same command again after an interruption continues where it stopped.
#
#   bash evaluate_I4.sh I4_DIR RESULT_DIR [CFG] [DATASETS] [NSHARDS] [-- extra evaluate_I4.py arguments]
#
#   I4_DIR      the DEMON core split: I4_DIR/<dataset>/core/core.json
#   RESULT_DIR  answers and scores: RESULT_DIR/<dataset>/pred.json, eval.json; RESULT_DIR/i4-score.txt
#   CFG         model config (default: eval_configs/sparkles_eval.yaml)
#   DATASETS    comma- or space-separated dataset names (default: every folder of I4_DIR with a core/core.json)
#   NSHARDS     shard processes per dataset (default: number of GPUs, or 1 on CPU)
#
# Extra arguments after "--" go to every evaluate_I4.py call (e.g. --protocol upstream, --batch-size 8); the
# scores use the same --protocol. Environment: PYTHON (default python), SPARKLES_ROOT, EVAL_LOG_DIR (default
# RESULT_DIR/logs).
set -uo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"  # paths given by the user stay relative to the caller's directory
source "$HERE/scripts/shards.sh"
split_args "$@"
if [[ ${#POS[@]} -lt 2 || ${#POS[@]} -gt 5 ]]; then
  echo "usage: bash evaluate_I4.sh I4_DIR RESULT_DIR [CFG] [DATASETS] [NSHARDS] [-- evaluate_I4.py args]" >&2
  exit 2
fi
I4_DIR="${POS[0]}"
RESULT_DIR="${POS[1]}"
CFG="${POS[2]:-$HERE/eval_configs/sparkles_eval.yaml}"
DATASETS="${POS[3]:-}"
NSHARDS="${POS[4]:-}"
PYTHON="${PYTHON:-python}"

if [[ -z "$DATASETS" ]]; then
  DATASETS=$(for f in "$I4_DIR"/*/core/core.json; do [[ -f "$f" ]] && basename "$(dirname "$(dirname "$f")")"; done)
fi
if [[ -z "$DATASETS" ]]; then
  echo "evaluate_I4.sh: no <dataset>/core/core.json under $I4_DIR" >&2
  exit 2
fi
PROTOCOL_ARGS=()
for ((i = 0; i < ${#EXTRA[@]}; i++)); do
  case "${EXTRA[i]}" in
    --protocol) PROTOCOL_ARGS=(--protocol "${EXTRA[i + 1]:-}") ;;
    --protocol=*) PROTOCOL_ARGS=("${EXTRA[i]}") ;;
  esac
done

shards_init "$NSHARDS" 1
LOG_DIR="${EVAL_LOG_DIR:-$RESULT_DIR/logs}"
mkdir -p "$LOG_DIR"

STATUS=0
SCORED=()
for DATASET in ${DATASETS//,/ }; do
  for (( i = 0; i < NSHARDS; i++ )); do
    shard_launch "$i" "$LOG_DIR/${DATASET}_shard${i}of${NSHARDS}.log" "$PYTHON" "$HERE/evaluate_I4.py" \
      --cfg-path "$CFG" --i4-dir "$I4_DIR" --dataset "$DATASET" --result-dir "$RESULT_DIR" --shard "$i/$NSHARDS" \
      --no-progress "${EXTRA[@]}"
  done
  if ! shards_wait "$DATASET"; then
    STATUS=1
    continue
  fi
  # every part is answered: this pass loads no model, it gathers the parts into pred.json and says so
  if ! CUDA_VISIBLE_DEVICES="" "$PYTHON" "$HERE/evaluate_I4.py" --cfg-path "$CFG" --i4-dir "$I4_DIR" \
       --dataset "$DATASET" --result-dir "$RESULT_DIR" --device cpu --no-progress "${EXTRA[@]}"; then
    STATUS=1
    continue
  fi
  SCORED+=("$DATASET")
done
if [[ ${#SCORED[@]} -gt 0 ]]; then
  "$PYTHON" "$HERE/calculate_I4.py" --result-dir "$RESULT_DIR" --i4-dir "$I4_DIR" --dataset "${SCORED[@]}" \
    ${PROTOCOL_ARGS[@]+"${PROTOCOL_ARGS[@]}"} || STATUS=1
  "$PYTHON" "$HERE/i4_score.py" --result-dir "$RESULT_DIR" ${PROTOCOL_ARGS[@]+"${PROTOCOL_ARGS[@]}"} || STATUS=1
fi
exit $STATUS
