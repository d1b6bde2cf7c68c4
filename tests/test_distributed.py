"""Multi-rank parity (torchrun, gloo): every TP/PP/SP layout computes what TP=1 computes.

Routing is active (p = 0.5, routers that keep roughly half of the tokens), the weights come from
one torch_dist checkpoint resharded on load, and one step runs through megatron-core's pipeline
schedule with 2 micro-batches and the load-reducing loss attached.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "distributed" / "mod_parallel_parity.py"
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], nproc: int = 1) -> None:
    if nproc == 1:
        cmd = [sys.executable, str(SCRIPT), *args]
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run",
            f"--nproc_per_node={nproc}", f"--master_port={_free_port()}",
            str(SCRIPT), *args,
        ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    ckpt = root / "ckpt"
    _run(["--save", str(ckpt)])
    out = root / "tp1.json"
    _run(["--load", str(ckpt), "--out", str(out)])
    return ckpt, json.loads(out.read_text())


LAYOUTS = {
    "tp2": (["--tp", "2"], 2),
    "pp2": (["--pp", "2"], 2),
    "tp2_sp": (["--tp", "2", "--sp"], 2),
    "tp2_pp2_sp": (["--tp", "2", "--pp", "2", "--sp"], 4),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parallel_layout_matches_tp1(reference, layout, tmp_path):
    ckpt, ref = reference
    flags, nproc = LAYOUTS[layout]
    out = tmp_path / f"{layout}.json"
    _run(["--load", str(ckpt), "--out", str(out), *flags], nproc=nproc)
    got = json.loads(out.read_text())

    assert got["world_size"] == nproc
    kept = [ref["kept_fraction"][str(i)] for i in range(4)]
    assert any(0.2 < f < 0.8 for f in kept), f"routing should be active: {kept}"
    assert got["kept_fraction"] == ref["kept_fraction"]
    assert got["lm_loss"] == pytest.approx(ref["lm_loss"], rel=1e-5)
    assert got["load_loss"] == pytest.approx(ref["load_loss"], rel=1e-6)
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    assert got["router_bias_grad"] == pytest.approx(ref["router_bias_grad"], rel=1e-4, abs=1e-9)
    assert got["router_weight_grad_norm"] == pytest.approx(ref["router_weight_grad_norm"], rel=1e-4)
    assert all(abs(g) > 0 for g in ref["router_bias_grad"])
