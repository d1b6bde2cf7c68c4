#!/usr/bin/env bash
# MoDification of a pretrained HF LLaMA on a GPU cluster: import with routers (or calibrate
# them) -> continued pretraining -> Hugging Face export. Run by the per-model scripts in
# examples/, which set the model's parallel layout.
#
# Two launch modes:
#   srun, one task per GPU (SLURM: srun --ntasks-per-node=$GPUS_PER_NODE ...): every rank is a
#       task of its own, so SLURM's SIGTERM (sbatch --signal=TERM@300, or preemption) reaches
#       each rank directly and --exit-signal-handler finishes the step, saves and exits 0.
#       The preemption-safe way.
#   torchrun, one task per node (elsewhere, or SLURM with one task per node): torchrun starts
#       the ranks. A SIGTERM to torchrun reaches the ranks through it, and the job is killed
#       KillWait (30 s by default) later: a large model may not finish saving in that time.
#
# Inputs (environment):
#   HF_DIR       the pretrained HF LLaMA directory (safetensors or pytorch_model*.bin)
#   DATA_ARGS    a --data-args-path blend file (tools/prepare_corpus.py writes one)
#   WORK         output root on a shared filesystem (default: work/<model>)
#   TP PP SP DIST_OPT GBS MBS SEQ ITERS LR MIN_LR WARMUP   layout and schedule (set per model)
#   RECOMPUTE    activation recomputation: none | selective | full (full: RECOMPUTE_METHOD
#                uniform|block and RECOMPUTE_NUM_LAYERS, default uniform 1); set per model
#   SAVE_INTERVAL, KEEP_LAST   training checkpoints every N steps, keeping the newest K; re-running
#                the script continues from the newest one (SIGTERM: finish the step, save, exit 0)
#   MOD_ARGS     extra --mod-* flags for the import (default: every_other, p = 0.5)
#   TARGET_COMPUTE  ask for this c_eff: routers are calibrated on CALIB_DATA (a JSONL/text file)
#                by tools/calibrate_routers.py instead of imported, and training steers every
#                routed layer to its calibrated budget (--mod-target-compute, ramped over
#                TARGET_WARMUP steps, default 200). Unset: the paper's fixed-alpha recipe.
#   GPUS_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT: the rendezvous; under SLURM they
#                default from SLURM_NNODES, SLURM_NODEID (SLURM_PROCID, SLURM_LOCALID) and the
#                first host of SLURM_JOB_NODELIST.
#   LAUNCH       srun | torchrun (default: srun when SLURM runs one task per GPU, else torchrun)
#   DRY_RUN=1    print the commands instead of running them
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

: "${MODEL:?set by the calling script}" "${HF_DIR:?HF_DIR: the pretrained HF model directory}"
: "${DATA_ARGS:?DATA_ARGS: a --data-args-path blend file (tools/prepare_corpus.py)}"
WORK=${WORK:-work/$MODEL}
PY=${PY:-python}
[ -x .venv/bin/python ] && PY=.venv/bin/python

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-${SLURM_NNODES:-1}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
if [ -z "${MASTER_ADDR:-}" ]; then
  if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  else
    MASTER_ADDR=localhost
  fi
fi
MASTER_PORT=${MASTER_PORT:-29500}
WORLD=$((GPUS_PER_NODE * NNODES))
if [ $((WORLD % (TP * PP))) -ne 0 ]; then
  echo "error: $WORLD GPUs are not a multiple of TP x PP = $TP x $PP" >&2
  exit 2
fi
DP=$((WORLD / (TP * PP)))
if [ -z "${LAUNCH:-}" ]; then
  LAUNCH=torchrun
  [ -n "${SLURM_PROCID:-}" ] && [ "${SLURM_NTASKS:-1}" = "$WORLD" ] && [ "$WORLD" -gt 1 ] \
    && LAUNCH=srun
fi
case "$LAUNCH" in
  srun)
    : "${SLURM_PROCID:?LAUNCH=srun needs SLURM_PROCID from srun, one task per GPU}"
    if [ "${SLURM_NTASKS:-0}" != "$WORLD" ]; then
      echo "error: LAUNCH=srun needs one task per GPU: SLURM_NTASKS=${SLURM_NTASKS:-unset}," \
        "but $NNODES node(s) x $GPUS_PER_NODE GPUs = $WORLD" >&2
      exit 2
    fi
    FIRST=$([ "$SLURM_PROCID" = 0 ] && echo 1 || echo 0) ;;
  torchrun) FIRST=$([ "$NODE_RANK" = 0 ] && echo 1 || echo 0) ;;
  *) echo "error: LAUNCH=$LAUNCH; use srun or torchrun" >&2; exit 2 ;;
esac

run() {
  if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

echo "== $MODEL: $NNODES node(s) x $GPUS_PER_NODE GPUs | TP $TP PP $PP DP $DP | $LAUNCH" \
  "| node $NODE_RANK"
CKPT_MOD=$WORK/ckpt_mod
CKPT_TRAINED=$WORK/ckpt_trained

# 1. Import or calibrate (one process; the others wait for the checkpoint on the shared
# filesystem).
if [ "$FIRST" = 1 ]; then
  if [ -f "$CKPT_MOD/latest" ]; then
    echo "== [1/3] $CKPT_MOD exists, import skipped"
  elif [ -n "${TARGET_COMPUTE:-}" ]; then
    : "${CALIB_DATA:?CALIB_DATA: calibration text (JSONL/text) for TARGET_COMPUTE}"
    echo "== [1/3] calibrate routers of $HF_DIR for c_eff $TARGET_COMPUTE -> $CKPT_MOD"
    run "$PY" tools/calibrate_routers.py --model "$HF_DIR" --data "$CALIB_DATA" \
      --target-compute "$TARGET_COMPUTE" --out-dir "$CKPT_MOD" --tp "$TP" --pp "$PP" \
      --dtype bf16 --device cuda --seq-length "${CALIB_SEQ:-2048}" \
      --num-sequences "${CALIB_SEQUENCES:-8}" --report-json "$WORK/calibration.json"
  else
    echo "== [1/3] import $HF_DIR -> $CKPT_MOD"
    # shellcheck disable=SC2086
    run "$PY" tools/convert_hf_to_megatron.py --hf-dir "$HF_DIR" --out-dir "$CKPT_MOD" \
      --tp "$TP" --pp "$PP" --dtype bf16 ${MOD_ARGS:---mod-routed-layers every_other --mod-threshold 0.5}
  fi
elif [ "${DRY_RUN:-0}" != 1 ]; then
  echo "== [1/3] waiting for the first task to write $CKPT_MOD"
  until [ -f "$CKPT_MOD/latest" ]; do sleep 10; done
fi

# 2. Continued pretraining with the load-reducing loss, on every node.
echo "== [2/3] continued pretraining -> $CKPT_TRAINED"
extra=()
[ "${SP:-0}" = 1 ] && extra+=(--sequence-parallel)
[ "${DIST_OPT:-1}" = 1 ] && extra+=(--use-distributed-optimizer --overlap-grad-reduce)
case "${RECOMPUTE:-none}" in
  none) ;;
  selective) extra+=(--recompute-granularity selective) ;;
  full) extra+=(--recompute-granularity full --recompute-method "${RECOMPUTE_METHOD:-uniform}"
                --recompute-num-layers "${RECOMPUTE_NUM_LAYERS:-1}") ;;
  *) echo "error: RECOMPUTE=$RECOMPUTE; use none, selective or full" >&2; exit 2 ;;
esac
compute=(--mod-load-loss-coeff 0.01)
[ -n "${TARGET_COMPUTE:-}" ] && compute+=(--mod-target-compute "$TARGET_COMPUTE"
                                           --mod-target-warmup-steps "${TARGET_WARMUP:-200}")
if [ "$LAUNCH" = srun ]; then
  # This task is one rank: megatron-mod reads torchrun's variables, set here from srun's.
  launcher=(env RANK="$SLURM_PROCID" WORLD_SIZE="$WORLD" LOCAL_RANK="${SLURM_LOCALID:-0}"
            MASTER_ADDR="$MASTER_ADDR" MASTER_PORT="$MASTER_PORT" "$PY")
else
  launcher=("$PY" -m torch.distributed.run --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES"
            --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
fi
run "${launcher[@]}" \
  tools/pretrain_mod.py --load "$CKPT_MOD" --save "$CKPT_TRAINED" \
  --data-args-path "$DATA_ARGS" --split 998,2,0 --data-cache-path "$WORK/data_cache" \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" "${extra[@]}" --bf16 \
  --seq-length "$SEQ" --micro-batch-size "$MBS" --global-batch-size "$GBS" \
  --train-iters "$ITERS" --lr "$LR" --min-lr "$MIN_LR" --lr-warmup-iters "$WARMUP" \
  --weight-decay 0.1 --clip-grad 1.0 "${compute[@]}" \
  --eval-interval 500 --eval-iters 10 --log-interval 10 \
  --save-interval "${SAVE_INTERVAL:-200}" --keep-last "${KEEP_LAST:-2}" --exit-signal-handler \
  --tensorboard-dir "$WORK/tensorboard" --summary-json "$WORK/pretrain_summary.json"

# 3. Export (the first task).
if [ "$FIRST" = 1 ]; then
  echo "== [3/3] export -> $WORK/hf_mod (transformers, trust_remote_code)"
  run "$PY" tools/convert_megatron_to_hf.py --ckpt-dir "$CKPT_TRAINED" --out-dir "$WORK/hf_mod" \
    --dtype bf16 --overwrite
fi
