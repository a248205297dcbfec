#!/usr/bin/env bash
# Score I4 (DEMON core) predictions, then average them per category. Every argument goes to calculate_I4.py;
# the result directory and the protocol are also handed to i4_score.py.
#
#   bash calculate_I4.sh --result-dir RESULTS --i4-dir I4_DIR [--dataset NAME ...] [--protocol default|upstream]
#
# Writes RESULTS/<dataset>/eval.json and eval_score.json, then RESULTS/i4-score.txt and i4-score.json.
# Environment: PYTHON (default python).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"  # paths given by the user stay relative to the caller's directory
PY="${PYTHON:-python}"

SCORE_ARGS=()
ARGS=("$@")
for ((i = 0; i < ${#ARGS[@]}; i++)); do
  case "${ARGS[i]}" in
    --result-dir|--protocol) SCORE_ARGS+=("${ARGS[i]}" "${ARGS[i + 1]:-}"); i=$((i + 1)) ;;
    --result-dir=*|--protocol=*) SCORE_ARGS+=("${ARGS[i]}") ;;
    -h|--help) exec "$PY" "$HERE/calculate_I4.py" --help ;;
  esac
done

rc=0
"$PY" "$HERE/calculate_I4.py" "$@" || rc=$?
if [[ $rc -eq 2 ]]; then exit 2; fi  # a usage error: nothing was scored
# the datasets that were scored still make a table when another one failed (calculate_I4.py said which)
"$PY" "$HERE/i4_score.py" ${SCORE_ARGS[@]+"${SCORE_ARGS[@]}"}
exit "$rc"
