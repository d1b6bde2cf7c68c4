#!/usr/bin/env bash
# MoDification of minima-2-3b (MiniMA-2-3B): import with routers, continued pretraining with the
# load-reducing loss, Hugging Face export. Layout: TP 1, PP 1, distributed
# optimizer; needs at least 1 GPUs (one 8-GPU node).
#
#   HF_DIR=/models/MiniMA-2-3B DATA_ARGS=data/blend.txt bash examples/convert_minima_2_3b.sh
#   # SLURM, one task per node:
#   HF_DIR=... DATA_ARGS=... srun --nodes=N --ntasks-per-node=1 bash examples/convert_minima_2_3b.sh
#
# Every setting below can be overridden from the environment; see examples/lib/modify_llama.sh.
export MODEL=minima-2-3b
export TP=${TP:-1} PP=${PP:-1} SP=${SP:-0} DIST_OPT=${DIST_OPT:-1}
export SEQ=${SEQ:-4096} MBS=${MBS:-2} GBS=${GBS:-256} ITERS=${ITERS:-2000}
export LR=${LR:-3e-5} MIN_LR=${MIN_LR:-3e-6} WARMUP=${WARMUP:-100}
exec bash "$(dirname "$0")/lib/modify_llama.sh"
