#!/usr/bin/env bash
# Run the test suite against another megatron-core release taken from a Megatron-LM clone, without
# touching the environment: the release's megatron/core is extracted into a scratch directory and
# put first on PYTHONPATH (child processes and torchrun workers inherit it).
#
#   bash scripts/test_against_core.sh MEGATRON_LM_GIT_DIR TAG [pytest args...]
#   e.g. bash scripts/test_against_core.sh ~/src/Megatron-LM/.git core_v0.19.0 -m "not slow"
#
# Python 3.11 hosts only install megatron-core 0.16.1 from the registry; 0.17-0.19 import on 3.11
# from source. Releases from 0.18 on import `triton` at load time: it is pip-installed into the
# scratch directory (WHEELS=DIR installs it from a local wheel instead of the package index).
# The dataset index helpers (helpers.cpp, unchanged since 0.16) are reused from the installed
# megatron-core's compiled module.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 2 ]]; then
    echo "usage: $0 MEGATRON_LM_GIT_DIR TAG [pytest args...]" >&2
    exit 2
fi
git_dir=$1
tag=$2
shift 2
if ! git --git-dir="$git_dir" rev-parse --verify --quiet "$tag^{commit}" >/dev/null; then
    echo "error: $git_dir has no tag $tag (list them: git --git-dir=$git_dir tag -l 'core_v*')" >&2
    exit 2
fi

scratch=$(mktemp -d "${TMPDIR:-/tmp}/megatron-core-$tag.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$scratch/src"
git --git-dir="$git_dir" archive "$tag" megatron/core | tar x -C "$scratch/src"

installed=$(.venv/bin/python - <<'EOF'
import glob, os, importlib.util
spec = importlib.util.find_spec("megatron.core")
print(glob.glob(os.path.join(os.path.dirname(spec.origin), "datasets", "helpers_cpp*"))[0])
EOF
)
cp "$installed" "$scratch/src/megatron/core/datasets/"

deps="$scratch/deps"
if grep -rqsE "^(import|from) triton" "$scratch/src/megatron/core"; then
    spec=triton
    if [[ -n "${WHEELS:-}" ]]; then
        spec=$(ls "$WHEELS"/triton-*.whl 2>/dev/null | head -1 || true)
        spec=${spec:-triton}
    fi
    echo "installing $spec into $deps (needed by $tag)"
    .venv/bin/python -m pip install -q --disable-pip-version-check --target "$deps" "$spec"
fi

export PYTHONPATH="$scratch/src:$deps${PYTHONPATH:+:$PYTHONPATH}"
.venv/bin/python -c "import megatron.core as m; print('megatron-core', m.__version__, 'from', m.__file__)"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} .venv/bin/python -m pytest -p no:cacheprovider "$@"
