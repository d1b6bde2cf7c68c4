"""What reaches a log file: megatron's internal deprecations and progress-bar redraws do not."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers.subprocess_utils import REPO, subprocess_env

_BUILD = """
import megatron_mod
from megatron_mod import platform
platform.initialize()
from megatron_mod.models import build_gpt_model, llama_config
from megatron_mod.config import MoDConfig
model = build_gpt_model(llama_config("tiny"), MoDConfig(), vocab_size=64, max_seq_len=32)
print("built")
"""


def test_megatron_deprecations_are_not_printed():
    proc = subprocess.run(
        [sys.executable, "-c", _BUILD], env=subprocess_env(), capture_output=True, text=True,
        timeout=300, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0 and "built" in proc.stdout, proc.stderr[-2000:]
    assert "full scope is deprecated" not in proc.stderr
    assert "ShardedTensor" not in proc.stderr


def test_base_model_pretraining_draws_no_bar_into_a_log(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples/quickstart/make_base_model.py"), "--out",
         str(tmp_path), "--steps", "3", "--layers", "2", "--hidden-size", "32",
         "--vocab-size", "300", "--seq-length", "32", "--batch-size", "2"],
        env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pretrain base:" not in proc.stderr and "it/s" not in proc.stderr
    quickstart = (REPO / "examples/quickstart_cpu.sh").read_text()
    assert "[ -t 2 ] || export HF_HUB_DISABLE_PROGRESS_BARS=1" in quickstart
