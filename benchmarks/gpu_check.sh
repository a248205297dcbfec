#!/usr/bin/env bash
# One-shot GPU check at the paper's size (EVA-ViT-g, Q-Former 768x12, a random 7B LLaMA-shaped decoder in bf16
# built on the GPU): `python -m benchmarks.gpu_check` (batch-1 decode tok/s of each decode mode vs the card's
# HBM-bandwidth bound, plain-vs-compiled greedy-margin agreement, turn-6 TTFT with cache reuse vs re-prefill,
# batch-8 vs batch-1 evaluation throughput, training-step MFU, the cached-feature step) and the upstream parity
# check. Bounded to < 8 min on one H100 by `timeout`s (model build ~1 min, compiling the decode step ~1 min).
#
#   bash benchmarks/gpu_check.sh --prepare   # HERE, once: copies into the git-ignored .whl/ what the device
#                                            # image lacks (omegaconf + antlr4, pure Python)
#   bash benchmarks/gpu_check.sh             # ON THE DEVICE, with .whl carried; results in $OUT
#   bash benchmarks/gpu_check.sh --dry-run   # anywhere: the same steps on the CPU at the toy size (~1-2 min)
#
# Files written to $OUT: gpu_check.json (all figures + a `checks` list), gpu_check.md (the table),
# gpu_check.log (full output), parity.json.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ "${1:-}" = "--prepare" ]; then
    set -e
    mkdir -p .whl/pydeps
    for pkg in omegaconf antlr4; do
        src=$($PY -c "import $pkg, os; print(os.path.dirname($pkg.__file__))")
        rm -rf ".whl/pydeps/$pkg"
        cp -r "$src" ".whl/pydeps/$pkg"
    done
    find .whl/pydeps -name __pycache__ -type d -prune -exec rm -rf {} +
    du -sh .whl
    echo "prepared .whl/ (git-ignored); carry it: run(command='bash benchmarks/gpu_check.sh', carry=['.whl'])"
    exit 0
fi
DRY=()
LIMIT=450
if [ "${1:-}" = "--dry-run" ]; then
    DRY=(--dry-run)
    LIMIT=240
elif [ -n "${1:-}" ]; then
    echo "usage: bash benchmarks/gpu_check.sh [--prepare | --dry-run]" >&2
    exit 2
fi

OUT=${OUT:-/tmp/sparkles_gpu_check}
mkdir -p "$OUT"
if ! $PY -c "import omegaconf" 2>/dev/null; then
    export PYTHONPATH="$PWD/.whl/pydeps${PYTHONPATH:+:$PYTHONPATH}"
fi
export TOKENIZERS_PARALLELISM=false
t0=$(date +%s)
echo "== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
DRY_RUN=${#DRY[@]} $PY - <<'PYEOF' || { echo "environment check FAILED"; exit 2; }
import os, torch, transformers, timm, omegaconf
print(f"torch {torch.__version__} cuda {torch.version.cuda} available={torch.cuda.is_available()} "
      f"transformers {transformers.__version__} timm {timm.__version__} omegaconf {omegaconf.__version__}")
assert os.environ["DRY_RUN"] != "0" or torch.cuda.is_available(), "no CUDA device (use --dry-run on a CPU)"
PYEOF

echo "== benchmarks.gpu_check ${DRY[*]} (timeout $LIMIT s)"
timeout "$LIMIT" $PY -m benchmarks.gpu_check "${DRY[@]}" --out "$OUT" >"$OUT/gpu_check.log" 2>&1
rc=$?
grep -v -E "^\s*$|Warning|warn\(|^W[0-9]{4} " "$OUT/gpu_check.log" | tail -n 100
[ $rc -eq 124 ] && echo "gpu_check: TIMED OUT after $LIMIT s (partial results in gpu_check.json)"
echo "gpu_check exit status: $rc"

echo "== parity (tests/fixtures/upstream_parity_tiny)"
timeout 120 $PY -m sparkles.tools.parity --fixture "$PWD/tests/fixtures/upstream_parity_tiny" \
    --json "$OUT/parity.json" 2>&1 | tail -n 6
prc=${PIPESTATUS[0]}
echo "parity exit status: $prc"
echo "== done in $(( $(date +%s) - t0 )) s; files in $OUT"
[ $rc -eq 0 ] && [ $prc -eq 0 ]
