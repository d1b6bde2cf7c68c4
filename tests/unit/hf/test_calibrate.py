"""Router calibration (megatron_mod.hf.calibrate, tools/calibrate_routers.py) at tiny size.

The calibrated checkpoint is checked through the real export: its HF ``llama_mod`` model routes
with the fitted routers, whose logits are compared with labels computed independently from the
stock transformers ``LlamaForCausalLM`` hidden states.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from tests.helpers.subprocess_utils import REPO
from tests.helpers.tiny_llama import make_tiny_hf_llama_with_text

sys.path.insert(0, str(REPO / "tools"))

import calibrate_routers  # noqa: E402

from megatron_mod.hf.calibrate import (  # noqa: E402
    CalibrationError,
    CalibrationSettings,
    allocate_skips,
    calibrate_hf_llama,
    concentrate_skips,
    fit_ridge,
)

SEQ, WINDOWS = 48, 8


# --------------------------------------------------------------------------- arithmetic


def test_allocate_skips_water_fills_inverse_to_cost():
    skips = allocate_skips({1: 1.0, 2: 4.0}, total_skip=0.5, max_skip=0.9, min_skip=0.0)
    # Minimising s1^2 + 4 s2^2 at s1 + s2 = 0.5: s1 = 4 s2.
    assert skips[1] == pytest.approx(0.4, abs=1e-9)
    assert skips[2] == pytest.approx(0.1, abs=1e-9)


def test_allocate_skips_caps_and_drops_small_shares():
    skips = allocate_skips({1: 1e-6, 2: 1.0, 3: 1.0, 4: 1e3}, 1.0, max_skip=0.5, min_skip=0.05)
    assert skips[1] == pytest.approx(0.5)  # capped: nearly free, but never beyond max_skip
    assert skips[2] == pytest.approx(0.25) and skips[3] == pytest.approx(0.25)
    assert 4 not in skips  # its share (~0.0005) is under min_skip: the layer stays dense
    assert sum(skips.values()) == pytest.approx(1.0)


def test_concentrate_skips_fills_the_cheapest_layers_first():
    skips = concentrate_skips({1: 3.0, 2: 1.0, 3: 2.0, 4: 0.5}, 1.7, max_skip=0.75, min_skip=0.1)
    assert skips == {4: 0.75, 2: 0.75, 3: pytest.approx(0.2)}
    # A remainder below min_skip is not worth a router: the plan computes a little more.
    assert concentrate_skips({1: 1.0, 2: 2.0}, 0.78, max_skip=0.75, min_skip=0.05) == {1: 0.75}
    with pytest.raises(CalibrationError, match="--max-skip"):
        concentrate_skips({1: 1.0}, 0.9, max_skip=0.75, min_skip=0.0)


def test_allocate_skips_refuses_an_impossible_target():
    with pytest.raises(CalibrationError, match="--max-skip"):
        allocate_skips({1: 1.0, 2: 1.0}, total_skip=1.5, max_skip=0.5, min_skip=0.0)


def test_fit_ridge_matches_least_squares():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=gen, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, 1.5], dtype=torch.float64) + 0.7
    y += 0.01 * torch.randn(500, generator=gen, dtype=torch.float64)
    aug = torch.cat([x, torch.ones(500, 1, dtype=torch.float64)], dim=1)
    w, b = fit_ridge(aug.T @ aug, aug.T @ y, 500, ridge=1e-8)
    reference = torch.linalg.lstsq(aug, y[:, None]).solution.squeeze(1)
    torch.testing.assert_close(w, reference[:6], atol=1e-6, rtol=0)
    assert b == pytest.approx(float(reference[6]), abs=1e-6)


def test_settings_name_the_bad_flag():
    with pytest.raises(CalibrationError, match="--start-compute"):
        CalibrationSettings(target_compute=0.8, start_compute=0.7)
    with pytest.raises(CalibrationError, match="--target-compute"):
        CalibrationSettings(target_compute=0.0)


# --------------------------------------------------------------------------- a tiny model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 6-layer tied LLaMA whose layers write clearly into the residual, with a tokenizer."""
    root = tmp_path_factory.mktemp("calibrate")
    model_dir, data, tok = make_tiny_hf_llama_with_text(root, lambda i: 2.0 + 2 * i, "calib.jsonl")
    return root, model_dir, data, tok


def _calibrate(tiny, name, mod_config=None, **kwargs):
    root, model_dir, data, _ = tiny
    settings = CalibrationSettings(**{"target_compute": 0.8, **kwargs})
    out = root / name
    plan = calibrate_hf_llama(
        model_dir, data, out, settings, mod_config=mod_config, seq_length=SEQ,
        num_sequences=WINDOWS, overwrite=True, log=lambda _: None, progress=False,
    )  # fmt: skip
    return out, plan


def _export(ckpt, out):
    from transformers import AutoModelForCausalLM

    from megatron_mod.hf.convert import convert_megatron_to_hf

    convert_megatron_to_hf(ckpt, out, overwrite=True, progress=False)
    return AutoModelForCausalLM.from_pretrained(
        out, trust_remote_code=True, dtype=torch.float32
    ).eval()


def _windows(tiny):
    from megatron_mod.hf.prune import load_text_windows

    _, _, data, tok = tiny
    return load_text_windows(data, tok, SEQ, WINDOWS)


def test_calibrated_checkpoint_starts_at_its_start_compute_and_records_the_plan(tiny):
    from megatron_mod.checkpointing import read_checkpoint_metadata

    ckpt, plan = _calibrate(tiny, "start_at_target", start_compute=0.8)
    num_layers = 6
    assert 0 not in plan.routed_layers and num_layers - 1 not in plan.routed_layers
    skipped = sum(1.0 - plan.layer_kept_targets[j] for j in plan.routed_layers)
    assert (num_layers - skipped) / num_layers == pytest.approx(0.8, abs=1e-6)
    assert all(0.25 - 1e-9 <= k <= 0.95 + 1e-9 for k in plan.layer_kept_targets.values())
    # Concentrated: every routed layer but the last one filled skips max_skip (0.75).
    assert sorted(plan.layer_kept_targets.values())[:-1] == pytest.approx(
        [0.25] * (len(plan.routed_layers) - 1)
    )
    assert plan.c_eff_measured == pytest.approx(0.8, abs=0.06)  # 96 held-out tokens
    for key in ("base", "plan", "plan_first_token_routable", "random_routing", "layer_removal"):
        assert math.isfinite(plan.losses[key])

    meta = read_checkpoint_metadata(ckpt)
    assert meta.mod["routed_layers"] == plan.routed_layers
    assert meta.mod["gate"] == "straight_through"
    assert {int(k): v for k, v in meta.mod["layer_kept_targets"].items()} == pytest.approx(
        plan.layer_kept_targets
    )
    assert meta.source["calibration"]["routed_layers"] == plan.routed_layers

    # Through the export: on the calibration windows each layer keeps its start fraction.
    model = _export(ckpt, tiny[0] / "start_at_target_hf")
    windows = _windows(tiny)
    with torch.no_grad():
        stats = model(input_ids=windows, use_cache=False, output_router_stats=True).router_stats
    for j in plan.routed_layers:
        assert stats[j]["kept_fraction"] == pytest.approx(plan.layer_start_kept[j], abs=0.02), j


def test_calibrated_routers_predict_the_label_from_stock_llama_hidden_states(tiny):
    """The exported router's logits against labels computed from transformers' own Llama."""
    from transformers import AutoModelForCausalLM

    ckpt, plan = _calibrate(tiny, "keep_all")
    model = _export(ckpt, tiny[0] / "keep_all_hf")
    stock = AutoModelForCausalLM.from_pretrained(tiny[1], dtype=torch.float32).eval()
    windows = _windows(tiny)
    fit, held = windows[:-2], windows[-2:]
    with torch.no_grad():
        stats = model(input_ids=windows, use_cache=False, output_router_stats=True).router_stats
        assert all(stats[j]["kept_fraction"] == 1.0 for j in plan.routed_layers)  # start 1.0
        hidden_fit = stock(input_ids=fit, output_hidden_states=True).hidden_states
        hidden_held = stock(input_ids=held, output_hidden_states=True).hidden_states
    checked = 0
    for j in plan.routed_layers:
        if j + 1 >= len(hidden_fit) - 1:
            continue  # the last hidden state is after the final norm
        router = model.model.layers[j].router

        def label_and_logit(hidden, j=j, router=router):
            h_in, h_out = hidden[j][:, 1:], hidden[j + 1][:, 1:]  # position 0 is always kept
            label = torch.log((h_out - h_in).norm(dim=-1) / h_in.norm(dim=-1)).flatten()
            return label, router(h_in).flatten()

        label, logit = label_and_logit(hidden_held)
        corr = torch.corrcoef(torch.stack([label, logit]))[0, 1]
        assert float(corr) == pytest.approx(plan.router_correlation[j], abs=1e-3)
        # In-sample, the ridge fit is as good as least squares.
        label, logit = label_and_logit(hidden_fit)
        x = hidden_fit[j][:, 1:].reshape(-1, hidden_fit[j].shape[-1])
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps)
        aug = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1).double()
        best = aug @ torch.linalg.lstsq(aug, label.double()[:, None]).solution.squeeze(1)
        best_corr = torch.corrcoef(torch.stack([label.double(), best]))[0, 1]
        ours = torch.corrcoef(torch.stack([label, logit]))[0, 1]
        assert float(ours) >= 0.95 * float(best_corr)
        checked += 1
    assert checked >= 1


def test_cli_help_shows_an_example_and_bad_input_names_the_flag(tiny, capsys):
    with pytest.raises(SystemExit):
        calibrate_routers.main(["--help"])
    assert "--target-compute 0.85" in capsys.readouterr().out
    root, model_dir, data, _ = tiny
    argv = ["--model", str(model_dir), "--data", str(data), "--out-dir", str(root / "bad"),
            "--seq-length", str(SEQ)]  # fmt: skip
    assert calibrate_routers.main([*argv, "--target-compute", "1.5"]) == 2
    assert "--target-compute 1.5" in capsys.readouterr().err
    assert calibrate_routers.main([*argv, "--target-compute", "0.1"]) == 2
    assert "--max-skip" in capsys.readouterr().err
    assert not (root / "bad").exists()  # nothing half-written


def test_cli_writes_the_report(tiny, capsys):
    root, model_dir, data, _ = tiny
    report = root / "report.json"
    argv = ["--model", str(model_dir), "--data", str(data), "--out-dir", str(root / "cli"),
            "--seq-length", str(SEQ), "--num-sequences", str(WINDOWS), "--target-compute",
            "0.85", "--report-json", str(report), "--no-progress"]  # fmt: skip
    assert calibrate_routers.main(argv) == 0
    out = capsys.readouterr().out
    plan = json.loads(report.read_text())
    assert f"routed layers {plan['routed_layers']}" in out
    assert (root / "cli" / "latest").is_file() and (root / "cli" / "iter_0000000").is_dir()


def test_calibration_in_skipped_kv_mode_measures_and_writes_that_mode(tiny):
    """With skipped tokens' K/V kept, the probes run in that mode (another loss than the
    kept-only mode) and the checkpoint and its export carry the setting."""
    from megatron_mod.checkpointing import read_checkpoint_metadata
    from megatron_mod.config import MoDConfig

    _, kept_only = _calibrate(tiny, "kv_kept_only", start_compute=0.8)
    mod = MoDConfig(gate="straight_through", skipped_kv=True)
    ckpt, plan = _calibrate(tiny, "kv_all", mod_config=mod, start_compute=0.8)
    assert read_checkpoint_metadata(ckpt).mod["skipped_kv"] is True
    assert plan.losses["plan"] != pytest.approx(kept_only.losses["plan"], rel=1e-6)
    model = _export(ckpt, tiny[0] / "kv_all_hf")
    assert model.config.mod_skipped_kv is True
    with torch.no_grad():
        stats = model(input_ids=_windows(tiny), use_cache=False, output_router_stats=True)
    for j in plan.routed_layers:
        kept = stats.router_stats[j]["kept_fraction"]
        assert kept == pytest.approx(plan.layer_start_kept[j], abs=0.02), j
