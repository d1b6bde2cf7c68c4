"""The README's quick-start demo trains a routed model on real text and reports routing."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.helpers.subprocess_utils import subprocess_env


def test_quickstart_trains_and_reports_routing(tmp_path):
    cmd = [
        sys.executable, "-m", "megatron_mod.training.quickstart",
        "--train-iters", "12", "--num-layers", "4", "--hidden-size", "64",
        "--micro-batch-size", "4", "--seq-length", "64",
        "--mod-router-init-bias", "0.0", "--mod-load-loss-coeff", "0.05",
        "--tensorboard-dir", str(tmp_path / "tb"),
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, env=subprocess_env(threads=2), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    first, last = re.search(r"lm loss ([\d.]+) -> ([\d.]+)", out).groups()
    assert float(last) < float(first) - 1.0, out
    kept = [float(x) for x in re.findall(r"layer \d+: ([\d.]+)", out)]
    assert len(kept) == 2  # every_other on 4 layers: layers 1 and 3
    c_eff = float(re.search(r"c_eff ([\d.]+)\n", out).group(1))
    assert abs(c_eff - (2 + sum(kept)) / 4) < 0.01
    assert any(f.name.startswith("events.out.tfevents") for f in (tmp_path / "tb").iterdir())
