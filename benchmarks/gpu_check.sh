#!/usr/bin/env bash
# One-shot GPU check: every benchmark at the paper's size (EVA-ViT-g, Q-Former 768x12, a random 7B LLaMA-shaped
# decoder in bf16 built on the GPU) plus the upstream parity check, with a compact summary. Bounded to < 6 min
# on one H100 by `timeout`s (typically ~2-3 min: model build ~1 min, benchmarks ~1-2 min).
#
#   bash benchmarks/gpu_check.sh --prepare   # HERE, once: copies into the git-ignored .whl/ what the device
#                                            # image lacks (omegaconf + antlr4, pure Python)
#   bash benchmarks/gpu_check.sh             # ON THE DEVICE, with .whl carried; results in $OUT
#
# Files written to $OUT: bench_full.json (all figures), bench_full.log (full output), parity.json.
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

OUT=${OUT:-/tmp/sparkles_gpu_check}
mkdir -p "$OUT"
if ! $PY -c "import omegaconf" 2>/dev/null; then
    export PYTHONPATH="$PWD/.whl/pydeps${PYTHONPATH:+:$PYTHONPATH}"
fi
export TOKENIZERS_PARALLELISM=false
t0=$(date +%s)
echo "== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
$PY - <<'EOF' || { echo "environment check FAILED"; exit 2; }
import torch, transformers, timm, omegaconf
print(f"torch {torch.__version__} cuda {torch.version.cuda} available={torch.cuda.is_available()} "
      f"transformers {transformers.__version__} timm {timm.__version__} omegaconf {omegaconf.__version__}")
assert torch.cuda.is_available(), "no CUDA device"
EOF

echo "== benchmarks --size full (timeout 400 s)"
timeout 400 $PY -m benchmarks.run_all --size full --out "$OUT/bench_full.json" >"$OUT/bench_full.log" 2>&1
rc=$?
# The log's tables and summary (the JSON holds everything).
grep -v -E "^\s*$|Warning|warn\(" "$OUT/bench_full.log" | tail -n 90
[ $rc -eq 124 ] && echo "benchmarks: TIMED OUT after 400 s (partial results in bench_full.json)"
echo "benchmarks exit status: $rc"

echo "== parity (tests/fixtures/upstream_parity_tiny)"
timeout 120 $PY -m sparkles.tools.parity --fixture "$PWD/tests/fixtures/upstream_parity_tiny" \
    --json "$OUT/parity.json" 2>&1 | tail -n 6
prc=${PIPESTATUS[0]}
echo "parity exit status: $prc"
echo "== done in $(( $(date +%s) - t0 )) s; files in $OUT"
[ $rc -eq 0 ] && [ $prc -eq 0 ]
