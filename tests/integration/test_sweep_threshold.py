"""``tools/sweep_threshold.py`` on a tiny HF MoD export with a locally trained tokenizer.

The loss and kept fractions the tool reports for a p are checked against the model's own
``labels`` loss and router statistics on windows the test builds itself; the JSONL and the
Megatron indexed-dataset readers must give identical results for the same tokens.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from megatron_mod.data.local_text import write_jsonl
from tests.helpers.tiny_llama import make_tiny_export
from tools.sweep_threshold import main as sweep_main
from tools.sweep_threshold import pareto_front

SEQ = 48


# Small CPU models run faster (and steadier) on one thread.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """(export dir, held-out docs): a random 4-layer MoD model, routers on layers 1 and 3."""
    return make_tiny_export(tmp_path_factory.mktemp("sweep"))


def _windows(tok, docs, n):
    ids = []
    for d in docs:
        ids += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return torch.tensor(ids[: n * SEQ]).view(n, SEQ), ids


def test_sweep_reports_the_models_own_loss_and_kept_fractions(export, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, docs = export
    data = write_jsonl(docs, tmp_path / "heldout.jsonl")
    rc = sweep_main(
        ["--model", str(model_dir), "--data", str(data), "--p", "0,0.5,1", "--seq-length",
         str(SEQ), "--num-sequences", "6", "--batch-size", "4", "--speed-context", "32",
         "--speed-new-tokens", "2", "--speed-rounds", "1", "--out-dir", str(tmp_path / "out")]
    )  # fmt: skip
    assert rc == 0
    result = json.loads((tmp_path / "out" / "sweep_threshold_model.json").read_text())
    assert (tmp_path / "out" / "sweep_threshold_model.png").stat().st_size > 10_000
    rows = {r["p"]: r for r in result["rows"]}
    assert result["num_sequences"] == 6 and rows[0.5]["scored_tokens"] == 6 * (SEQ - 1)

    # Reference: the same windows built here, the model's own labels loss and router stats.
    tok = AutoTokenizer.from_pretrained(model_dir)
    windows, _ = _windows(tok, docs, 6)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    model.set_mod_threshold(0.5)
    with torch.no_grad():
        out = model(windows, labels=windows, output_router_stats=True)
    assert rows[0.5]["loss"] == pytest.approx(float(out.loss), rel=1e-5)
    assert rows[0.5]["perplexity"] == pytest.approx(math.exp(float(out.loss)), rel=1e-5)
    for layer in (1, 3):
        assert rows[0.5]["kept"][str(layer)] == pytest.approx(
            out.router_stats[layer]["kept_fraction"], abs=1e-4
        )
    kept = [out.router_stats[i]["kept_fraction"] for i in (1, 3)]
    assert rows[0.5]["c_eff"] == pytest.approx((2 + sum(kept)) / 4, abs=1e-4)
    assert 0.55 < rows[0.5]["c_eff"] < 0.95  # routing really skips some tokens
    # p = 0 keeps every token (g >= 0 always); p = 1 keeps none (g < 1 for these logits).
    assert rows[0]["c_eff"] == 1.0 and rows[1]["c_eff"] == 0.5
    assert rows[0]["prefill_speedup_vs_p0"] == 1.0
    assert all(r["prefill_s"] > 0 and r["decode_ms_per_token"] > 0 for r in rows.values())
    # p = 0 computes the most, so it is on the c_eff Pareto front only if its loss is lowest.
    best = min(rows.values(), key=lambda r: r["loss"])
    assert best["pareto_c_eff"] and rows[1]["pareto_c_eff"]


def test_indexed_dataset_prefix_gives_the_same_result_as_jsonl(export, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from transformers import AutoTokenizer

    model_dir, docs = export
    tok = AutoTokenizer.from_pretrained(model_dir)
    prefix = tmp_path / "heldout_text_document"
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32)
    for d in docs:
        ids = tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        builder.add_document(torch.tensor(ids, dtype=torch.int32), [len(ids)])
    builder.finalize(str(prefix) + ".idx")
    data = write_jsonl(docs, tmp_path / "heldout.jsonl")
    common = ["--model", str(model_dir), "--p", "0.4,0.6", "--seq-length", str(SEQ),
              "--num-sequences", "5", "--no-speed", "--no-plot"]  # fmt: skip
    assert sweep_main([*common, "--data", str(prefix), "--out-dir", str(tmp_path / "a")]) == 0
    assert sweep_main([*common, "--data", str(data), "--out-dir", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "sweep_threshold_model.json").read_text())["rows"]
    b = json.loads((tmp_path / "b" / "sweep_threshold_model.json").read_text())["rows"]
    for ra, rb in zip(a, b):
        assert ra["loss"] == rb["loss"] and ra["kept"] == rb["kept"]
        assert "prefill_s" not in ra


def test_bad_inputs_name_the_flag_and_file(export, tmp_path, capsys):
    model_dir, _ = export
    missing = tmp_path / "nope.jsonl"
    assert sweep_main(["--model", str(model_dir), "--data", str(missing), "--no-plot"]) == 2
    assert f"--data {missing}" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text key"}\n')
    assert sweep_main(["--model", str(model_dir), "--data", str(bad), "--no-plot"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and "--json-key" in err
    with pytest.raises(SystemExit):
        sweep_main(["--model", str(model_dir), "--data", str(bad), "--p", "0.5,2"])


def test_pareto_front():
    # (p, cost, loss): 0.7 is beaten by 0.5 on both; the rest trade cost for loss.
    points = [(0.3, 0.9, 2.0), (0.5, 0.7, 2.1), (0.7, 0.8, 2.2), (0.9, 0.6, 2.5)]
    assert pareto_front(points) == {0.3, 0.5, 0.9}
