#!/usr/bin/env bash
# CPU quick-start: set up the environment and train a tiny routed LLaMA-shaped model on real text,
# printing LM loss, load-reducing loss, per-layer kept fraction and c_eff.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python -m megatron_mod.training.quickstart "$@"
