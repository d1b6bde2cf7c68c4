#!/usr/bin/env bash
# One prepared run of everything only a CUDA GPU can show, sized for <= 8 minutes on one
# H100/H200-class GPU. Run it from the repository root on a GPU host:
#
#   bash scripts/gpu_check.sh                     # pip can reach a package index
#   bash scripts/gpu_check.sh --wheels DIR        # offline: wheels prepared in DIR (see below)
#
# It keeps the host's CUDA build of torch (a virtualenv with --system-site-packages), installs
# megatron-core and this package's other requirements around it (never another torch), and
# Transformer Engine when a wheel installs within two minutes (optional: the local spec is used
# otherwise). Then it runs, each step under its own time limit so one slow step cannot sink the
# rest:
#   1. pytest -m gpu    (tests/integration/test_gpu.py: bf16 training with DDP overlap,
#                                           sync count, converters, HF device_map, trainer e2e)
#   2. the CPU suite's MoD-core tests on this host (tests/unit/test_router.py, test_layer.py,
#      test_gpu_readiness.py)
#   3. benchmarks/bench_layer.py on CUDA (bf16; MoD vs dense layer and model ratios)
#   4. benchmarks/bench_inference.py on CUDA when it exists (HF MoD vs LlamaForCausalLM)
#   5. benchmarks/bench_checkpoint.py on CUDA when it exists
# Results land in benchmarks/results/ (named after the GPU) plus gpu_check_<gpu>.json, a summary
# with every step's status, duration and log tail. Commit them.
#
# Offline hosts: on a machine with pip access, for the GPU host's Python (e.g. 3.12):
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d wheels megatron-core==0.16.1 gguf
# copy `wheels/` next to the repository and pass --wheels wheels.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=""
PYTHON=${PYTHON:-python3}
VENV=${GPU_CHECK_VENV:-.venv-gpu}
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS="$2"; shift 2 ;;
    --python) PYTHON="$2"; shift 2 ;;
    -h|--help) sed -n 2,27p "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: $PYTHON has no CUDA-enabled torch, or no GPU is visible; nothing to check" >&2
  exit 2
fi

START=$(date +%s)
RESULTS=benchmarks/results
LOGS=$(mktemp -d)
mkdir -p "$RESULTS"

# ---------------------------------------------------------------- environment
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"
PIP_SOURCE=()
if [ -n "$WHEELS" ]; then
  PIP_SOURCE=(--no-index --find-links "$WHEELS")
fi
# The host's torch stays: pin it so no requirement can replace it.
constraints=$(mktemp)
"$PY" -c 'import torch; print(f"torch=={torch.__version__}")' > "$constraints"
pip_install() {
  "$PY" -m pip install --quiet --disable-pip-version-check "${PIP_SOURCE[@]}" -c "$constraints" "$@"
}
if ! "$PY" -c 'import megatron.core' 2>/dev/null; then
  pip_install "megatron-core>=0.16,<0.20" || { echo "gpu_check: megatron-core did not install" >&2; exit 2; }
fi
# Requirements besides torch/megatron-core: keep whatever the host already has.
grep -vE '^(torch|megatron-core)==|^#|^$' requirements.txt | sed 's/==.*//' > "$LOGS/reqs.txt"
while read -r req; do
  "$PY" -c "import importlib.metadata as m; m.version('$req')" 2>/dev/null || pip_install "$req" \
    || echo "gpu_check: optional requirement $req did not install" >&2
done < "$LOGS/reqs.txt"
for extra in pytest pytest-timeout gguf accelerate matplotlib; do
  "$PY" -c "import importlib.metadata as m; m.version('$extra')" 2>/dev/null || pip_install "$extra" \
    || echo "gpu_check: optional package $extra did not install" >&2
done
pip_install --no-deps -e . || { echo "gpu_check: installing megatron-mod failed" >&2; exit 2; }
if ! "$PY" -c 'import transformer_engine.pytorch' 2>/dev/null; then
  timeout 120 "$PY" -m pip install --quiet "${PIP_SOURCE[@]}" -c "$constraints" \
    --only-binary=:all: "transformer-engine[pytorch]" >/dev/null 2>&1 \
    || echo "gpu_check: no Transformer Engine wheel installed; the TE-spec test is skipped"
fi
rm -f "$constraints"

GPU=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')
TAG=$(echo "$GPU" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '_' | sed 's/_*$//')
echo "gpu_check on: $GPU ($("$PY" -c 'import torch, megatron.core as m; print("torch", torch.__version__, "| megatron-core", m.__version__)'))"

# ---------------------------------------------------------------- steps
STEPS_JSON="$LOGS/steps.jsonl"
: > "$STEPS_JSON"
run_step() {  # name, time limit (s), command...
  local name=$1 limit=$2; shift 2
  local log="$LOGS/$name.log" t0 rc
  t0=$(date +%s)
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$log" 2>&1
  rc=$?
  tail -n 15 "$log"
  "$PY" - "$name" "$rc" "$(( $(date +%s) - t0 ))" "$log" >> "$STEPS_JSON" <<'EOF'
import json, sys
name, rc, seconds, log = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
tail = open(log, errors="replace").read()[-4000:]
status = "passed" if rc == 0 else ("timed out" if rc == 124 else "failed")
print(json.dumps({"step": name, "status": status, "exit_code": rc, "seconds": seconds, "log_tail": tail}))
EOF
}

export PYTHONUNBUFFERED=1
run_step pytest_gpu 240 "$PY" -m pytest -m gpu tests/integration/test_gpu.py -q -p no:cacheprovider \
  --timeout 200
run_step pytest_core 90 "$PY" -m pytest tests/unit/test_router.py tests/unit/test_layer.py \
  tests/unit/test_gpu_readiness.py -q -p no:cacheprovider
run_step bench_layer 120 "$PY" benchmarks/bench_layer.py --device cuda --seq-lens 2048,8192 \
  --hidden 2048 --heads 16 --query-groups 4 --layers 4 --repeats 10 --warmup 3
if [ -f benchmarks/bench_inference.py ]; then
  run_step bench_inference 120 "$PY" benchmarks/bench_inference.py --device cuda \
    --contexts 4096,16384,32768 --batches 1,4 --rounds 2 --no-plot
fi
if [ -f benchmarks/bench_checkpoint.py ]; then
  run_step bench_checkpoint 60 "$PY" benchmarks/bench_checkpoint.py --device cuda
fi

"$PY" - "$STEPS_JSON" "$RESULTS/gpu_check_${TAG}.json" "$GPU" "$(( $(date +%s) - START ))" <<'EOF'
import json, os, platform, sys, tempfile
import torch, megatron.core
steps = [json.loads(line) for line in open(sys.argv[1])]
summary = {
    "device": sys.argv[3],
    "seconds": int(sys.argv[4]),
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "megatron_core": megatron.core.__version__,
    "python": platform.python_version(),
    "steps": steps,
}
try:
    import transformer_engine
    summary["transformer_engine"] = transformer_engine.__version__
except Exception:
    summary["transformer_engine"] = None
fd, tmp = tempfile.mkstemp(dir=os.path.dirname(sys.argv[2]))
with os.fdopen(fd, "w") as f:
    json.dump(summary, f, indent=1)
os.replace(tmp, sys.argv[2])
print()
for s in steps:
    print(f"{s['step']:18s} {s['status']:10s} {s['seconds']:4d} s")
print(f"summary: {sys.argv[2]} ({summary['seconds']} s on {summary['device']})")
EOF
rm -rf "$LOGS"
