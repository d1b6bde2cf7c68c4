"""Trainer runs for the multi-layout tests: one command line, checked, its summary returned."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers.subprocess_utils import REPO, python_launcher, subprocess_env

STEPS = 4
COMMON = [
    "--split", "95,5,0", "--seq-length", "64", "--micro-batch-size", "2",
    "--global-batch-size", "8", "--train-iters", str(STEPS), "--lr", "1e-3", "--min-lr", "1e-4",
    "--lr-warmup-iters", "1", "--eval-iters", "1", "--log-interval", "1", "--overwrite",
]  # fmt: skip


def run_checked(cmd: list[str], timeout: int = 600) -> None:
    # The device guard fails a run whose batches, loss buffers or collectives would use host
    # tensors on a GPU (megatron_mod.device_guard).
    env = dict(subprocess_env(), MEGATRON_MOD_DEVICE_GUARD="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}{proc.stderr[-5000:]}"


def make_converted_tiny_llama(work, convert_flags: list[str]) -> None:
    """A 4-layer, hidden-64 LLaMA (5 pretraining steps), its indexed corpus and its import.

    Writes ``work/base`` (the HF model), ``work/data/stdlib_text_document`` and ``work/ckpt``
    (``tools/convert_hf_to_megatron.py`` with ``convert_flags``).
    """
    py = sys.executable
    run_checked([py, str(REPO / "examples/quickstart/make_base_model.py"), "--out", str(work),
                 "--steps", "5", "--layers", "4", "--hidden-size", "64", "--vocab-size",
                 "600"])  # fmt: skip
    preprocess_and_convert(work, convert_flags)


def preprocess_and_convert(work, convert_flags: list[str]) -> None:
    """``work/corpus/train.jsonl`` -> ``work/data/stdlib_text_document``, ``work/base`` ->
    ``work/ckpt`` (``tools/convert_hf_to_megatron.py`` with ``convert_flags``)."""
    py = sys.executable
    run_checked([py, str(REPO / "tools/preprocess_data.py"), "--input",
                 str(work / "corpus/train.jsonl"), "--output-prefix", str(work / "data/stdlib"),
                 "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                 str(work / "base"), "--append-eod", "--workers", "1",
                 "--no-progress"])  # fmt: skip
    run_checked([py, str(REPO / "tools/convert_hf_to_megatron.py"), "--hf-dir", str(work / "base"),
                 "--out-dir", str(work / "ckpt"), *convert_flags])  # fmt: skip


def run_pretrain(work, name: str, nproc: int, flags: list[str]) -> dict:
    launcher = python_launcher(nproc)
    summary = work / f"{name}.json"
    run_checked(
        [
            *launcher,
            str(REPO / "tools" / "pretrain_mod.py"),
            "--load",
            str(work / "ckpt"),
            "--save",
            str(work / f"trained_{name}"),
            "--summary-json",
            str(summary),
            "--data-path",
            "1.0",
            str(work / "data" / "stdlib_text_document"),
            *COMMON,
            *flags,
        ]  # fmt: skip
    )
    return json.loads(summary.read_text())
