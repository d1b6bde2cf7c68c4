#!/usr/bin/env bash
# MoDification of llama2-70b (Llama-2-70b-hf): import with routers, continued pretraining with the
# load-reducing loss, Hugging Face export. Layout: TP 8, PP 4, sequence parallel, distributed
# optimizer; needs at least 32 GPUs (four 8-GPU nodes).
#
#   HF_DIR=/models/Llama-2-70b-hf DATA_ARGS=data/blend.txt bash examples/convert_llama2_70b.sh
#   # SLURM, one task per node:
#   HF_DIR=... DATA_ARGS=... srun --nodes=N --ntasks-per-node=1 bash examples/convert_llama2_70b.sh
#
# Every setting below can be overridden from the environment; see examples/lib/modify_llama.sh.
export MODEL=llama2-70b
export TP=${TP:-8} PP=${PP:-4} SP=${SP:-1} DIST_OPT=${DIST_OPT:-1}
export SEQ=${SEQ:-4096} MBS=${MBS:-1} GBS=${GBS:-256} ITERS=${ITERS:-2000}
export LR=${LR:-3e-5} MIN_LR=${MIN_LR:-3e-6} WARMUP=${WARMUP:-100}
exec bash "$(dirname "$0")/lib/modify_llama.sh"
