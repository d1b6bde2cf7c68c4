#!/usr/bin/env bash
# MoDification of llama2-70b (Llama-2-70b-hf): import with routers, continued pretraining with the
# load-reducing loss, Hugging Face export. Layout: TP 8, PP 4, sequence parallel, distributed
# optimizer; needs at least 32 GPUs (four 8-GPU nodes).
#
#   HF_DIR=/models/Llama-2-70b-hf DATA_ARGS=data/blend.txt bash examples/convert_llama2_70b.sh
#   # SLURM, one task per GPU (SIGTERM reaches every rank: saves on preemption):
#   HF_DIR=... DATA_ARGS=... srun --nodes=N --ntasks-per-node=8 --gpus-per-node=8 bash examples/convert_llama2_70b.sh
#
# Memory per GPU, 32 GPUs (TP 8 x PP 4, DP 1), bf16 with fp32 main weights, sequence 4096, MBS 1.
# 69B params / 32 = 2.16B params per GPU:
#   bf16 weights 2 B/param = 4.3 GB; fp32 gradient buffer 4 B = 8.6 GB; distributed optimizer
#   (fp32 main weights + two Adam moments, 12 B) / DP = 25.9 GB at DP 1 (6.5 GB at DP 4, 128 GPUs)
#   -> 38.8 GB of state.
#   Activations, per layer per micro-batch with TP 8 + SP: s*b*h*34/t bytes = 4096*8192*34/8
#   = 143 MB (the attention-score term 5*a*s^2*b/t = 670 MB more unless the attention is fused
#   or recomputed); 20 layers per stage, and the first stage holds PP = 4 micro-batches in
#   flight under 1F1B: 20 * 4 * 143 MB = 11.4 GB. Routed layers (every other) keep only the
#   kept tokens' activations, so MoD at c = 0.5 needs ~3/4 of it.
#   No recomputation: ~50 GB (fused attention) or ~104 GB (unfused) -> does not fit 80 GB unfused.
#   selective (default; recompute the attention core): ~50 GB either way.
#   full, uniform, 1 layer: only each layer's input is kept (8 MB x 80 in flight) plus one
#   layer's activations during its recomputation: ~40 GB, at ~1/3 more compute.
# Every setting below can be overridden from the environment; see examples/lib/modify_llama.sh.
export MODEL=llama2-70b
export TP=${TP:-8} PP=${PP:-4} SP=${SP:-1} DIST_OPT=${DIST_OPT:-1}
export SEQ=${SEQ:-4096} MBS=${MBS:-1} GBS=${GBS:-256} ITERS=${ITERS:-2000}
export LR=${LR:-3e-5} MIN_LR=${MIN_LR:-3e-6} WARMUP=${WARMUP:-100}
export RECOMPUTE=${RECOMPUTE:-selective} SAVE_INTERVAL=${SAVE_INTERVAL:-100} KEEP_LAST=${KEEP_LAST:-2}
exec bash "$(dirname "$0")/lib/modify_llama.sh"
