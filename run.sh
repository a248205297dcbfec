#!/usr/bin/env bash
# Train SparklesChat, then evaluate it on BISON, NLVR2 and SparklesEval.
#
#   bash run.sh                  CPU default: generate the CPU world, train the tiny SparklesChat on it in three
#                                stages (towers that read the question; the decoder's verdict warm-up on text-only
#                                drills; dialogues), evaluate it (the world's reference judge for SparklesEval; the
#                                world's I4 split beside a trivial baseline), write everything under outputs/tiny/
#                                and print a summary (summary.json there).
#   bash run.sh ROOT [NGPU]      the paper pipeline on GPUs: torchrun train.py with train_configs/sparkleschat.yaml
#                                on NGPU GPUs (default 8), then evaluate.sh on BISON and NLVR2 (and SparklesEval
#                                when OPENAI_API_KEY or OPENAI_BASE_URL is set).
#
# Environment: SPARKLES_OUT (CPU default's folder, default outputs/tiny), SPARKLES_PROCS (training processes,
# default 2 where the machine has 2 cores or more: torchrun, one thread each), SPARKLES_PRESET (default | ci: a
# small world and a short training, used by the tests), STAGE0_OPTIONS / STAGE1_OPTIONS / TRAIN_OPTIONS (extra
# --options for the towers, the warm-up and the dialogue stage), EVAL_BATCH (default 16), SKIP_INSTALL=1 (do not
# check/install requirements), PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
CHILDREN=()
trap 'echo "run.sh: interrupted, stopping children"; for p in "${CHILDREN[@]:-}"; do kill "$p" 2>/dev/null || true; done; exit 130' INT TERM

ensure_installed() {
  if [[ "${SKIP_INSTALL:-0}" == 1 ]]; then return; fi
  if "$PYTHON" -c "import sparkles, torch, timm, transformers, omegaconf, rouge, sklearn" >/dev/null 2>&1; then return; fi
  echo "[run.sh] Sparkles or its requirements are missing: installing into $("$PYTHON" -c 'import sys; print(sys.prefix)')"
  echo "[run.sh]   (bash scripts/install.sh: torch/torchvision if absent, then pip install -e '.[dev]')"
  PYTHON="$PYTHON" bash scripts/install.sh
}

# One training stage: train.py under torchrun with $PROCS one-thread processes (the tiny model's matrices are too
# small to keep two threads of one process busy: two processes train ~1.5x the samples a second), each taking its
# share of the config's batch, so that the optimisation is the config's whatever the process count. A run of
# run.sh retrains every stage, so each replaces the checkpoints of an earlier run (--overwrite).
#   train_stage CONFIG ROOT [KEY=VALUE ...]   (the overrides go to train.py --options)
train_stage() {
  local cfg=$1 root=$2; shift 2
  local opts=("$@")
  if (( PROCS <= 1 )); then
    "$PYTHON" train.py --cfg-path "$cfg" --sparkles_root "$root" --overwrite ${opts[@]:+--options "${opts[@]}"}
    return
  fi
  local batch
  batch=$("$PYTHON" -c "from omegaconf import OmegaConf; print(OmegaConf.load('$cfg').run.batch_size_train)")
  if (( batch % PROCS )); then
    echo "run.sh: the batch of $cfg ($batch) does not divide among $PROCS processes; set SPARKLES_PROCS" >&2
    exit 2
  fi
  OMP_NUM_THREADS=1 "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$PROCS" \
    train.py --cfg-path "$cfg" --sparkles_root "$root" --overwrite --options "${opts[@]}" \
    run.batch_size_train=$(( batch / PROCS ))
}

run_tiny() {
  local stage0_cfg=train_configs/sparkleschat_tiny_towers.yaml
  local stage1_cfg=train_configs/sparkleschat_tiny_reasoning.yaml stage2_cfg=train_configs/sparkleschat_tiny.yaml
  local out=${SPARKLES_OUT:-outputs/tiny} preset=${SPARKLES_PRESET:-default} batch=${EVAL_BATCH:-16}
  PROCS=${SPARKLES_PROCS:-$(( $(nproc) >= 2 ? 2 : 1 ))}
  local stage0_opts=(${STAGE0_OPTIONS:-}) stage1_opts=(${STAGE1_OPTIONS:-}) train_opts=(${TRAIN_OPTIONS:-})
  if [[ "$preset" == ci ]]; then
    stage0_opts=(run.iters_per_epoch=${CI_STAGE0_ITERS:-300} run.warmup_steps=10 "${stage0_opts[@]}")
    stage1_opts=(run.iters_per_epoch=${CI_ITERS:-30} run.warmup_steps=5 "${stage1_opts[@]}")
    train_opts=(run.max_epoch=1 run.iters_per_epoch=${CI_ITERS:-30} run.warmup_steps=5 "${train_opts[@]}")
  fi
  mkdir -p "$out"
  echo "[run.sh] CPU default: tiny SparklesChat on the procedural world in $out (preset $preset)"
  local t0; t0=$(now)
  if [[ ! -f "$out/world/scenes.json" || ! -f "$out/models/tiny_llm/tokenizer.json" ]]; then
    "$PYTHON" -m sparkles.tinyworld --out "$out" --seed 0 --preset "$preset"
  elif [[ ! -f "$out/evaluation/DemoChat/annotations/demo_chats.json" ]]; then
    echo "[run.sh] the world in $out has no demo chats: writing it again (it replaces only its own files)"
    "$PYTHON" -m sparkles.tinyworld --out "$out" --seed 0 --preset "$preset" --force
  else
    echo "[run.sh] world found in $out (delete the folder to regenerate it)"
  fi
  local t1; t1=$(now)
  # The first stage pretrains the vision towers on the world's scene tags and on what each image's message asks
  # (the stand-in for EVA-CLIP/BLIP-2 weights); with the towers frozen, the second teaches a fresh decoder the step
  # from an answer's facts to its verdict on text-only drills, and the third trains it on the dialogues, where it
  # learns to read those facts from the towers.
  train_stage "$stage0_cfg" "$out" "${stage0_opts[@]}"
  train_stage "$stage1_cfg" "$out" "${stage1_opts[@]}"
  train_stage "$stage2_cfg" "$out" "${train_opts[@]}"
  local t2; t2=$(now)
  local ds name=models_sparkleschat_tiny_checkpoint_last  # evaluate.py's name for the checkpoint trained above
  for ds in BISON NLVR2 SparklesEval; do
    local judge=()
    [[ "$ds" == SparklesEval ]] && judge=(--judge_models reference)
    rm -rf "$out/evaluation/$ds/results/${ds}_${name}"*  # answers of an earlier training of this folder's model
    "$PYTHON" evaluate.py --cfg-path eval_configs/sparkles_tiny.yaml --sparkles_root "$out" --dataset "$ds" \
      --inference --merge-results --batch-size "$batch" --max-new-tokens 120 "${judge[@]}"
  done
  # The held-out chats whose images are labelled IMAGE#1.. in upload order, replayed as the demo asks them
  "$PYTHON" -m sparkles.tinyworld.demo_chat --cfg-path eval_configs/sparkles_tiny.yaml --sparkles_root "$out" \
    --max-new-tokens 120
  # I4: the world's DEMON-format split, the model's answers and a trivial baseline's, both scored per category
  local i4=$out/evaluation/I4
  if [[ ! -f "$i4/Spot-the-Diff/core/core.json" ]]; then
    "$PYTHON" -m sparkles.tinyworld --out "$out" --preset "$preset" --i4-only
  fi
  local i4_sets; i4_sets=$(cd "$i4" && for f in */core/core.json; do echo "${f%%/*}"; done)
  rm -rf "$i4/results/sparkleschat_tiny" "$i4/results/baseline"
  # shellcheck disable=SC2086  # one argument per dataset name
  "$PYTHON" evaluate_I4.py --cfg-path eval_configs/sparkles_tiny.yaml --sparkles_root "$out" --i4-dir "$i4" \
    --dataset $i4_sets --result-dir "$i4/results/sparkleschat_tiny" --batch-size "$batch" --max-new-tokens 80
  "$PYTHON" -m sparkles.tinyworld --out "$out" --i4-baseline "$i4/results/baseline"
  local r
  for r in sparkleschat_tiny baseline; do
    "$PYTHON" calculate_I4.py --result-dir "$i4/results/$r" --i4-dir "$i4"
    "$PYTHON" i4_score.py --result-dir "$i4/results/$r"
  done
  local t3; t3=$(now)
  "$PYTHON" -m sparkles.tools.summary --root "$out" --train-seconds "$(elapsed "$t1" "$t2")" \
    --eval-seconds "$(elapsed "$t2" "$t3")" --i4-results "$i4/results/sparkleschat_tiny" \
    --i4-baseline "$i4/results/baseline" --demo-chat "$out/evaluation/DemoChat/results/demo_chat_$name.json" \
    --extra "{\"world_seconds\": $(elapsed "$t0" "$t1"), \"total_seconds\": $(elapsed "$t0" "$t3"),
              \"preset\": \"$preset\", \"processes\": $PROCS}"
  local demo="python demo.py"
  [[ "$out" != outputs/tiny ]] && demo="python demo.py --sparkles_root $out"
  echo "[run.sh] result pages: $out/evaluation/*/results/*.html; chat with it: $demo"
}

run_paper() {
  local root=$1 ngpu=${2:-8}
  echo "[run.sh] paper pipeline: root $root, $ngpu GPU(s)"
  local t0; t0=$(now)
  torchrun --nproc-per-node "$ngpu" train.py --cfg-path train_configs/sparkleschat.yaml --sparkles_root "$root" \
    ${TRAIN_OPTIONS:+--options $TRAIN_OPTIONS}
  local t1; t1=$(now)
  echo "[run.sh] training took $(elapsed "$t0" "$t1") s"
  local datasets="BISON NLVR2"
  if [[ -n "${OPENAI_API_KEY:-}${OPENAI_BASE_URL:-}" ]]; then datasets="BISON NLVR2 SparklesEval"; fi
  local ckpt_opt="model.ckpt=${PAPER_CKPT:-models/SparklesChat/checkpoint_last.pth}"
  bash evaluate.sh "$root" eval_configs/sparkles_eval.yaml "$datasets" "$ngpu" -- --options "$ckpt_opt"
  echo "[run.sh] evaluation took $(elapsed "$t1" "$(now)") s"
}

ensure_installed
if [[ $# -eq 0 ]]; then
  run_tiny
else
  run_paper "$@"
fi
