#!/usr/bin/env bash
# Lint, format check and the full test suite (multi-rank torchrun tests included).
# Pass pytest arguments through, e.g. `bash scripts/run_tests.sh -m "not slow"` for a quick run.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} .venv/bin/python -m pytest "$@"
