#!/usr/bin/env bash
# MoDification of minima-2-3b (MiniMA-2-3B): import with routers, continued pretraining with the
# load-reducing loss, Hugging Face export. Layout: TP 1, PP 1, distributed
# optimizer; needs at least 1 GPUs (one 8-GPU node).
#
#   HF_DIR=/models/MiniMA-2-3B DATA_ARGS=data/blend.txt bash examples/convert_minima_2_3b.sh
#   # SLURM, one task per GPU (SIGTERM reaches every rank: saves on preemption):
#   HF_DIR=... DATA_ARGS=... srun --nodes=N --ntasks-per-node=8 --gpus-per-node=8 bash examples/convert_minima_2_3b.sh
#
# Memory per GPU (TP 1, DP 8, bf16, distributed optimizer): ~3B params -> 6 GB weights, 12 GB
# fp32 grads, 36/DP = 4.5 GB optimizer; activations ~9 GB at MBS 2 x 4096 with fused attention:
# ~32 GB, so no recomputation (RECOMPUTE=selective if the attention is not fused).
# Every setting below can be overridden from the environment; see examples/lib/modify_llama.sh.
export MODEL=minima-2-3b
export TP=${TP:-1} PP=${PP:-1} SP=${SP:-0} DIST_OPT=${DIST_OPT:-1}
export SEQ=${SEQ:-4096} MBS=${MBS:-2} GBS=${GBS:-256} ITERS=${ITERS:-2000}
export LR=${LR:-3e-5} MIN_LR=${MIN_LR:-3e-6} WARMUP=${WARMUP:-100}
export RECOMPUTE=${RECOMPUTE:-none} SAVE_INTERVAL=${SAVE_INTERVAL:-200} KEEP_LAST=${KEEP_LAST:-2}
exec bash "$(dirname "$0")/lib/modify_llama.sh"
