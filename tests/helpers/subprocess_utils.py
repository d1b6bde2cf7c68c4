"""Running tools and multi-rank scripts from tests in clean child processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
"""The repository root."""
DISTRIBUTED_SCRIPTS = REPO / "tests" / "integration" / "distributed"
"""The torchrun worker scripts the multi-rank tests launch."""

# Set by torchrun in a worker; a child started from a test must not inherit a parent's rendezvous.
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    """A TCP port that is free right now on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def python_launcher(nproc: int = 1) -> list[str]:
    """The command prefix that runs a script in one process, or under torchrun on ``nproc``."""
    if nproc == 1:
        return [sys.executable]
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
    ]  # fmt: skip


def subprocess_env(threads: int = 1) -> dict[str, str]:
    """This process's environment minus torch.distributed variables, with the repo importable.

    The device guard is on unless ``MEGATRON_MOD_DEVICE_GUARD`` is set otherwise.

    The repo goes first on ``PYTHONPATH``; entries already there are kept (e.g. a source tree of
    another megatron-core version to test against).
    """
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    path = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    # Tools and multi-rank scripts run under the device guard (megatron_mod.device_guard): a host
    # tensor where a GPU run needs the compute device fails the test, as CUDA would.
    env.setdefault("MEGATRON_MOD_DEVICE_GUARD", "1")
    return dict(env, OMP_NUM_THREADS=str(threads), PYTHONPATH=path)


def run_script(
    script: Path | str, args: list[str], nproc: int = 1, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run ``script`` with plain python (``nproc == 1``) or under torchrun; raise with its logs."""
    cmd = [*python_launcher(nproc), str(script), *args]
    proc = subprocess.run(
        cmd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n"
            + proc.stdout[-3000:]
            + proc.stderr[-6000:]
        )
    return proc


def launcher_dry_run(script: str, **env) -> subprocess.CompletedProcess:
    """Run ``examples/<script>`` with ``DRY_RUN=1`` (it prints its commands) and fixed inputs."""
    return subprocess.run(
        ["bash", str(REPO / "examples" / script)],
        env=dict(
            subprocess_env(),
            HF_DIR="/models/base",
            DATA_ARGS="/data/blend.txt",
            DRY_RUN="1",
            WORK="/shared/work",
            **env,
        ),  # fmt: skip
        capture_output=True,
        text=True,
        timeout=60,
    )
