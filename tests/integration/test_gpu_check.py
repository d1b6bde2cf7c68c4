"""scripts/gpu_check.sh on a host without an index: wheels prepared here, installed offline.

The GPU host reaches no package index and its ``python3`` is itself a virtualenv; the check
must install megatron-core and the rest from the prepared wheels into a target directory on
``PYTHONPATH`` (no second torch, no ``pip install -e .``) and import everything from there.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.helpers.subprocess_utils import REPO, subprocess_env

SCRIPT = REPO / "scripts" / "gpu_check.sh"


def _run(args, **env):
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=REPO, env=dict(subprocess_env(), **env),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_steps_fit_the_visit_and_cpu_tests_hide_cuda():
    proc = _run(["--list-steps"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    budget = int(lines[-1].split()[1])
    steps = {line.split()[0]: (int(line.split()[1]), line) for line in lines[:-1]}
    assert budget <= 480 and sum(limit for limit, _ in steps.values()) <= budget
    assert "CUDA_VISIBLE_DEVICES= " in steps["pytest_core"][1]
    assert "smollm2-shape" in steps["bench_inference"][1]  # the GGUF cannot travel
    assert "32768" in steps["bench_long"][1]


@pytest.mark.slow
def test_prepare_then_install_offline_from_a_virtualenv_python(tmp_path):
    assert sys.prefix != sys.base_prefix, "the test's Python is meant to be a virtualenv"
    wheels, deps = tmp_path / "whl", tmp_path / "deps"
    proc = _run(["--prepare", "--python-version", "3.11", "--wheels", str(wheels),
                 "--python", sys.executable])  # fmt: skip
    if proc.returncode == 2 and "index reachable" in proc.stderr:
        pytest.skip(f"no package index here: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = sorted(p.name for p in wheels.glob("*.whl"))
    assert any(n.startswith("megatron_core-0.16.1-cp311") for n in names), names
    assert not any(n.startswith(("torch-", "transformers-", "nvidia")) for n in names), names
    total = float(re.search(r"total ([\d.]+) MiB", proc.stdout).group(1))
    assert total <= 48

    # Offline: the index is unreachable; every wheel goes into the target directory.
    proc = _run(
        ["--install-only", "--wheels", str(wheels), "--python", sys.executable, "--all-wheels"],
        GPU_CHECK_DEPS=str(deps), PIP_INDEX_URL="http://127.0.0.1:9/simple",
        PIP_FIND_LINKS="", PYTHONPATH="",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (deps / "megatron" / "core").is_dir() and (deps / "nltk").is_dir()
    assert not (deps / "torch").exists()  # never a second torch
    for module in ("megatron.core", "nltk"):
        line = next(x for x in proc.stdout.splitlines() if x.strip().startswith(module + " "))
        assert str(deps) in line, line  # imported from the wheels, not the host's copy
    assert f"megatron_mod 0.1.0 ({REPO}" in proc.stdout  # the repository on PYTHONPATH

    # A broken wheel set fails loudly before any step.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "megatron_core-0.16.1-py3-none-any.whl").write_bytes(b"not a zip")
    proc = _run(["--install-only", "--wheels", str(bad), "--python", sys.executable,
                 "--all-wheels"], GPU_CHECK_DEPS=str(tmp_path / "deps2"))  # fmt: skip
    assert proc.returncode == 2
    assert "installing the wheels" in proc.stderr
