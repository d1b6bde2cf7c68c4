"""lm-evaluation-harness on the HF MoD export: ``lm_eval --model hf`` with ``trust_remote_code``.

A multiple-choice task defined here (YAML over a local JSONL file, read by ``datasets``' json
builder: nothing is downloaded) runs through the ``lm_eval`` command on a tiny export; every
log-likelihood it reports is recomputed directly with the MoD model (and differs from the stock
LLaMA with the same weights, so routing was in effect), and its accuracy follows from them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.tiny_llama import make_tiny_export

pytestmark = pytest.mark.slow

TASK = """task: mod_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _run_lm_eval(model_dir: Path, tasks: Path, out: Path, tmp: Path, extra: str = "") -> dict:
    lm_eval = Path(sys.executable).with_name("lm_eval")
    if not lm_eval.exists():
        pytest.skip("lm-eval is not installed (pip install -r requirements-dev.txt)")
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp / "datasets_cache"),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        str(lm_eval), "--model", "hf",
        "--model_args", f"pretrained={model_dir},trust_remote_code=True,dtype=float32{extra}",
        "--tasks", "mod_tiny_choice", "--include_path", str(tasks), "--batch_size", "4",
        "--device", "cpu", "--output_path", str(out), "--log_samples",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = out.rglob("results_*.json")
    (samples,) = out.rglob("samples_mod_tiny_choice_*.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    return {"acc": json.loads(results.read_text())["results"]["mod_tiny_choice"]["acc,none"],
            "samples": rows}  # fmt: skip


def _loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context), tokenized as lm-eval does (whole string, then split)."""
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    return float(sum(logprobs[i - 1, whole[i]] for i in range(n_ctx, len(whole))))


def _stock(model):
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {k: v for k, v in model.config.to_dict().items() if not k.startswith("mod_")}
    for key in ("model_type", "architectures", "auto_map"):
        fields.pop(key, None)
    stock = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    state = {k: v for k, v in model.state_dict().items() if ".router." not in k}
    stock.load_state_dict(state)
    return stock


def test_lm_eval_hf_backend_scores_the_mod_export(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, _ = make_tiny_export(tmp_path)
    rng = random.Random(0)
    words = ["apple", "river", "stone", "cloud", "music", "table", "light", "garden"]
    docs = []
    for i in range(12):
        a, b, c = rng.sample(words, 3)
        docs.append({"question": f"The {a} is next to the", "choices": [b, a, c], "answer": i % 3})
    data = tmp_path / "choice.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mod_tiny_choice.yaml").write_text(TASK.format(data=data))

    result = _run_lm_eval(model_dir, tasks, tmp_path / "out", tmp_path)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    stock = _stock(model)
    assert len(result["samples"]) == len(docs)
    correct, routed_differs = 0, False
    for sample in result["samples"]:
        doc = sample["doc"]
        reported = [float(r[0][0]) for r in sample["resps"]]
        direct = [_loglikelihood(model, tok, doc["question"], " " + c) for c in doc["choices"]]
        assert reported == pytest.approx(direct, abs=1e-3), doc
        dense = [_loglikelihood(stock, tok, doc["question"], " " + c) for c in doc["choices"]]
        routed_differs |= max(abs(x - y) for x, y in zip(direct, dense)) > 1e-2
        correct += max(range(3), key=lambda i: direct[i]) == doc["answer"]
    assert routed_differs  # the harness ran the routed model, not a dense one
    assert result["acc"] == pytest.approx(correct / len(docs))

    # p passes through --model_args like any from_pretrained keyword: p = 0 computes every
    # token (still with the scale gate), which changes the scores.
    low = _run_lm_eval(model_dir, tasks, tmp_path / "out_p0", tmp_path, ",mod_threshold=0.0")
    model_p0 = AutoModelForCausalLM.from_pretrained(
        model_dir, trust_remote_code=True, mod_threshold=0.0
    ).eval()
    doc = low["samples"][0]["doc"]
    reported = [float(r[0][0]) for r in low["samples"][0]["resps"]]
    direct = [_loglikelihood(model_p0, tok, doc["question"], " " + c) for c in doc["choices"]]
    assert reported == pytest.approx(direct, abs=1e-3)
    assert reported != pytest.approx(
        [float(r[0][0]) for r in result["samples"][0]["resps"]], abs=1e-3
    )
    shutil.rmtree(tmp_path / "datasets_cache", ignore_errors=True)
