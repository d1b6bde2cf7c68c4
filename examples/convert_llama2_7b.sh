#!/usr/bin/env bash
# MoDification of llama2-7b (Llama-2-7b-hf): import with routers, continued pretraining with the
# load-reducing loss, Hugging Face export. Layout: TP 2, PP 1, sequence parallel, distributed
# optimizer; needs at least 2 GPUs (one 8-GPU node).
#
#   HF_DIR=/models/Llama-2-7b-hf DATA_ARGS=data/blend.txt bash examples/convert_llama2_7b.sh
#   # SLURM, one task per GPU (SIGTERM reaches every rank: saves on preemption):
#   HF_DIR=... DATA_ARGS=... srun --nodes=N --ntasks-per-node=8 --gpus-per-node=8 bash examples/convert_llama2_7b.sh
#
# Memory per GPU (TP 2, DP 4, bf16, distributed optimizer): 3.4B params/GPU -> 6.7 GB weights,
# 13.5 GB fp32 grads, 10 GB optimizer shard; activations ~9 GB (32 layers x 4096 tokens, SP):
# ~40 GB. Selective recomputation (the attention core) keeps the unfused path within that too.
# Every setting below can be overridden from the environment; see examples/lib/modify_llama.sh.
export MODEL=llama2-7b
export TP=${TP:-2} PP=${PP:-1} SP=${SP:-1} DIST_OPT=${DIST_OPT:-1}
export SEQ=${SEQ:-4096} MBS=${MBS:-1} GBS=${GBS:-256} ITERS=${ITERS:-2000}
export LR=${LR:-3e-5} MIN_LR=${MIN_LR:-3e-6} WARMUP=${WARMUP:-100}
export RECOMPUTE=${RECOMPUTE:-selective} SAVE_INTERVAL=${SAVE_INTERVAL:-200} KEEP_LAST=${KEEP_LAST:-2}
exec bash "$(dirname "$0")/lib/modify_llama.sh"
