"""The README's main job end to end: examples/quickstart_cpu.sh on a very small model.

Base model -> preprocessing -> HF import with routers -> continued pretraining with the load
loss -> HF export -> transformers load, generate() and a run-time threshold sweep. Each stage
is checked on what it leaves behind, not only on its exit status.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from tests.helpers.subprocess_utils import REPO, subprocess_env

TRAIN_ITERS = 12


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    work = tmp_path_factory.mktemp("quickstart")
    env = dict(
        subprocess_env(threads=2),
        WORK=str(work),
        SKIP_SETUP="1",
        BASE_STEPS="40",
        TRAIN_ITERS=str(TRAIN_ITERS),
        BASE_ARGS="--layers 4 --hidden-size 64 --vocab-size 600",
    )
    proc = subprocess.run(
        ["bash", str(REPO / "examples" / "quickstart_cpu.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return work, proc.stdout


@pytest.mark.slow
def test_preprocessed_corpus_holds_every_training_document(quickstart):
    work, _ = quickstart
    docs = (work / "corpus" / "train.jsonl").read_text().splitlines()
    dataset = IndexedDataset(str(work / "data" / "stdlib_text_document"))
    assert len(dataset) == len(docs) > 1000


@pytest.mark.slow
def test_converted_model_starts_with_every_token_kept_and_training_routes(quickstart):
    _, out = quickstart
    before = re.search(r"validation \(before training\) .*\| kept (.*)", out).group(1)
    assert [float(x.split(":")[1]) for x in before.split()] == [1.0, 1.0]  # layers 1 and 3
    losses = [float(x) for x in re.findall(r"iteration +\d+/\d+ \| lm loss ([\d.]+)", out)]
    assert len(losses) >= 2 and all(0 < x < 20 for x in losses)
    assert f"iteration {TRAIN_ITERS:5d}/{TRAIN_ITERS}" in out


@pytest.mark.slow
def test_trained_checkpoint_is_exported_as_llama_mod(quickstart):
    work, _ = quickstart
    assert (work / "ckpt_trained" / "latest").read_text().strip() == f"iter_{TRAIN_ITERS:07d}"
    config = json.loads((work / "hf_mod" / "config.json").read_text())
    assert config["model_type"] == "llama_mod" and config["mod_routed_layers"] == [1, 3]
    for name in ("modeling_llama_mod.py", "tokenizer.json", "model.safetensors"):
        assert (work / "hf_mod" / name).is_file(), name


@pytest.mark.slow
def test_runtime_threshold_sweep_keeps_fewer_tokens_as_p_grows(quickstart):
    _, out = quickstart
    rows = re.findall(r"^\| ([\d.]+) \| ([\d.]+) \| [\d.]+ \| ([\d.]+) \|$", out, re.MULTILINE)
    sweep = [(float(p), float(loss), float(kept)) for p, loss, kept in rows]
    assert [p for p, _, _ in sweep] == [0.0, 0.3, 0.5, 0.7]
    kept = [k for _, _, k in sweep]
    assert kept[0] == 1.0 and kept == sorted(kept, reverse=True)
    assert "greedy continuation of 'Return the'" in out
