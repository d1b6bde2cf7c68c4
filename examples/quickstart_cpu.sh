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
# Environment knobs: WORK (output dir, default work/quickstart), BASE_STEPS, TRAIN_ITERS,
# BASE_ARGS (extra make_base_model.py flags, e.g. "--layers 4 --hidden-size 64"), SKIP_SETUP=1.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${SKIP_SETUP:-0}" != 1 ]; then bash scripts/setup_env.sh; fi

WORK=${WORK:-work/quickstart}
BASE_STEPS=${BASE_STEPS:-200}
TRAIN_ITERS=${TRAIN_ITERS:-60}
PY=.venv/bin/python
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
export TOKENIZERS_PARALLELISM=false
mkdir -p "$WORK"

echo "== [1/6] tiny base model, tokenizer and corpus -> $WORK"
# shellcheck disable=SC2086  # BASE_ARGS is a list of flags
$PY examples/quickstart/make_base_model.py --out "$WORK" --steps "$BASE_STEPS" ${BASE_ARGS:-}

echo "== [2/6] preprocess the corpus into a Megatron indexed dataset"
$PY tools/preprocess_data.py --input "$WORK/corpus/train.jsonl" \
  --output-prefix "$WORK/data/stdlib" --tokenizer-type HuggingFaceTokenizer \
  --tokenizer-model "$WORK/base" --append-eod --workers 2

echo "== [3/6] import HF LLaMA -> megatron-mod checkpoint with routers"
$PY tools/convert_hf_to_megatron.py --hf-dir "$WORK/base" --out-dir "$WORK/ckpt_mod" --overwrite \
  --mod-routed-layers every_other --mod-threshold 0.5 --mod-router-init-bias 2.0

echo "== [4/6] continued pretraining with the load-reducing loss"
$PY tools/pretrain_mod.py --load "$WORK/ckpt_mod" --save "$WORK/ckpt_trained" --overwrite \
  --data-path 1.0 "$WORK/data/stdlib_text_document" --split 95,5,0 \
  --seq-length 128 --micro-batch-size 8 --train-iters "$TRAIN_ITERS" --lr 2e-3 --min-lr 2e-4 \
  --mod-load-loss-coeff 0.01 --eval-iters 4 --log-interval 10 \
  --tensorboard-dir "$WORK/tensorboard"

echo "== [5/6] export -> Hugging Face llama_mod model"
$PY tools/convert_megatron_to_hf.py --ckpt-dir "$WORK/ckpt_trained" --out-dir "$WORK/hf_mod" \
  --overwrite

echo "== [6/6] load with transformers, generate, sweep the threshold p"
$PY examples/quickstart/generate.py --model "$WORK/hf_mod" --prompt "Return the" \
  --corpus "$WORK/corpus/heldout.jsonl"
echo "done: outputs in $WORK"
