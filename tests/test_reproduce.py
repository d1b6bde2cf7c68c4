"""examples/reproduce_smollm2.sh at its tiny budget: every variant, resumable, honest report."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.subprocess_utils import subprocess_env

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples" / "reproduce"))

from reproduce import topk_capacity  # noqa: E402


def _run(work: Path, *extra: str) -> subprocess.CompletedProcess:
    env = subprocess_env(threads=2)
    env["PY"] = sys.executable
    cmd = ["bash", str(REPO / "examples" / "reproduce_smollm2.sh"), "--budget", "tiny",
           "--work", str(work), *extra]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)


def test_topk_capacity_matches_c_eff():
    # 30 layers, 15 routed: c_eff 0.75 needs half the tokens on each routed layer.
    assert topk_capacity(0.75, 30, 15) == pytest.approx(0.5)
    assert topk_capacity(1.0, 4, 2) == 1.0
    cap = topk_capacity(0.8, 4, 2)
    assert (4 - 2 + 2 * cap) / 4 == pytest.approx(0.8)
    assert topk_capacity(0.3, 4, 2) == 0.01  # below what the layout allows: the smallest capacity


def _heldout_loss(model_dir: Path, heldout: Path, seq: int, count: int) -> float:
    """Reference: transformers' own loss (labels=ids) on windows of the held-out docstrings."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids: list[int] = []
    for line in heldout.read_text().splitlines():
        ids += tok(json.loads(line)["text"], add_special_tokens=False).input_ids
        ids.append(tok.eos_token_id)
    windows = torch.tensor(ids[: seq * count]).view(count, seq)
    with torch.no_grad():
        losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in windows]
    return sum(losses) / len(losses)  # equal-length windows: the token-weighted mean


@pytest.mark.slow
def test_reproduce_tiny_runs_every_variant_and_resumes(tmp_path):
    work = tmp_path / "w"
    proc = _run(work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    report_path = next(work.glob("reproduce_tiny_*.json"))
    report = json.loads(report_path.read_text())
    assert report_path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {r["name"]: r for r in report["variants"]}
    names = ["base", "a_modification", "b_topk", "c_shortgpt", "d_routers_only", "e_dense"]
    assert list(rows) == names
    layers = report["data"]["base_layers"]
    assert layers == 4

    # Same budget for every trained variant.
    budget = report["budget_settings"]
    for name in ("a_modification", "b_topk", "c_shortgpt", "e_dense"):
        assert rows[name]["train"]["last_iteration"] == budget["train_iters"], name
    # The untouched base's held-out loss equals transformers' own loss on the same text.
    ref = _heldout_loss(work / "base", work / "corpus" / "heldout.jsonl",
                        budget["eval_seq_length"], budget["eval_windows"])  # fmt: skip
    assert rows["base"]["loss_in_domain"] == pytest.approx(ref, abs=1e-4)
    assert rows["base"]["c_eff"] == 1.0 and rows["e_dense"]["c_eff"] == 1.0

    # (a): c_eff is the computed fraction over all layers (routed layers count their kept share).
    a = rows["a_modification"]
    kept = a["kept_per_routed_layer"]
    assert sorted(kept) == ["1", "3"]
    assert a["c_eff"] == pytest.approx((layers - 2 + sum(kept.values())) / layers, abs=1e-3)
    assert a["settings"]["compute_control"]  # says controller or fixed alpha
    # (b) top-k at a's c_eff: capacity from a, measured c_eff within one token per layer.
    b = rows["b_topk"]
    assert b["settings"]["capacity"] == pytest.approx(topk_capacity(a["c_eff"], 4, 2), abs=1e-4)
    assert abs(b["c_eff"] - a["c_eff"]) <= 2 / budget["eval_seq_length"] + 1e-6
    # (c) whole layers removed to about a's c_eff; the trained export has that many layers.
    c = rows["c_shortgpt"]
    n_removed = len(c["settings"]["removed_layers"])
    assert n_removed == layers - math.floor(a["c_eff"] * layers + 0.5)
    assert c["c_eff"] == pytest.approx((layers - n_removed) / layers)
    config = json.loads((Path(c["hf_dir"]) / "config.json").read_text())
    assert config["num_hidden_layers"] == layers - n_removed
    # (d) runs only when the trainer offers routers-only training, and says why not otherwise.
    d = rows["d_routers_only"]
    if "--mod-train-routers-only" in report["trainer_flags_used"]:
        assert d["status"] == "done"
    else:
        assert d["status"] == "not run" and "--mod-train-routers-only" in d["reason"]
    for r in report["variants"]:
        if r["status"] == "done":
            assert math.isfinite(r["loss_in_domain"]) and math.isfinite(r["loss_other"])
            assert r["speed"]["prefill_s"] > 0
            assert r["label"] in out  # a table row per variant
    assert rows["base"]["speed"]["speedup_vs_base"] == 1.0
    assert report["data"]["heldout_other"] != report["data"]["heldout_in_domain"]
    assert not list((work / "variants").glob("*/ckpt_*"))  # finished: exports only

    # Re-run: finished variants are skipped and keep their numbers; a removed one is redone.
    (work / "variants" / "e_dense" / "result.json").unlink()
    again = _run(work)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for name in ("base", "a_modification", "b_topk", "c_shortgpt"):
        assert f"== {name}: done before, skipped" in again.stdout
    assert "== e_dense: (e) dense" in again.stdout
    rerun = {r["name"]: r for r in json.loads(report_path.read_text())["variants"]}
    assert rerun["a_modification"]["loss_in_domain"] == a["loss_in_domain"]
    # Same data order and seed: the redone dense run reproduces its loss.
    assert rerun["e_dense"]["loss_in_domain"] == pytest.approx(
        rows["e_dense"]["loss_in_domain"], abs=1e-4
    )
