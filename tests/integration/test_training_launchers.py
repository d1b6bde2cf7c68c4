"""The cluster launchers write periodic training checkpoints, resume, handle SIGTERM, and pass
each model size's activation recomputation to the trainer."""

from __future__ import annotations

import shlex
import subprocess

import pytest

from tests.helpers.subprocess_utils import REPO, launcher_dry_run, subprocess_env

RECOMPUTE = {
    "convert_minima_2_3b.sh": None,
    "convert_llama2_7b.sh": "selective",
    "convert_llama2_13b.sh": "selective",
    "convert_llama2_70b.sh": "selective",
}


def _train_args(script: str, **env):
    from megatron_mod.training.arguments import parse_args

    proc = launcher_dry_run(script, NNODES="4", NODE_RANK="0", MASTER_ADDR="node001", **env)
    assert proc.returncode == 0, proc.stderr
    train = next(shlex.split(x) for x in proc.stdout.splitlines() if "pretrain_mod.py" in x)
    return parse_args(train[train.index("tools/pretrain_mod.py") + 1 :])


@pytest.mark.parametrize("script", list(RECOMPUTE))
def test_launcher_saves_periodically_and_sets_recomputation(script):
    args = _train_args(script)
    assert args.save_interval > 0 and args.keep_last == 2 and args.exit_signal_handler
    assert args.recompute_granularity == RECOMPUTE[script]
    assert not args.overwrite  # re-running the script continues the run in --save


def test_launcher_full_recomputation_and_overrides():
    args = _train_args("convert_llama2_70b.sh", RECOMPUTE="full", SAVE_INTERVAL="50")
    assert (args.recompute_granularity, args.recompute_method, args.recompute_num_layers) == (
        "full",
        "uniform",
        1,
    )
    assert args.save_interval == 50
    proc = subprocess.run(
        ["bash", str(REPO / "examples" / "convert_llama2_7b.sh")],
        env=dict(subprocess_env(), HF_DIR="/m", DATA_ARGS="/d", DRY_RUN="1", RECOMPUTE="some"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "RECOMPUTE=some" in proc.stderr
