"""The compute-target controller's arithmetic: targets, threshold placement, floor, state.

Whether it reaches its targets on a real model trained by the real trainer is
``tests/integration/test_compute_target.py``; here the controller is fed logit quantiles of
known distributions and must place thresholds where those distributions keep the scheduled
fraction.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from megatron_mod.config import MoDConfig
from megatron_mod.router import QUANTILE_GRID, gate_threshold_logit, logit_quantiles
from megatron_mod.training.controller import (
    ComputeTargetConfig,
    ComputeTargetController,
    layer_targets,
)


def _normal_quantiles(shift: float = 0.0, scale: float = 1.0, seed: int = 0) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(20000, generator=gen) * scale + shift
    return logit_quantiles(logits).tolist()


def test_layer_targets_uniform_shaped_and_infeasible():
    mod = MoDConfig(routed_layers="1,3")
    assert layer_targets(mod, 4, 0.8, 0.1) == {1: pytest.approx(0.6), 3: pytest.approx(0.6)}
    shaped = MoDConfig(routed_layers="1,3", layer_kept_targets={1: 0.9, 3: 0.5})
    kept = layer_targets(shaped, 4, 0.8, 0.1)
    assert (2 + kept[1] + kept[3]) / 4 == pytest.approx(0.8, abs=1e-6)
    assert 1.0 - kept[3] == pytest.approx(5 * (1.0 - kept[1]), rel=1e-4)  # skips 5x as much
    with pytest.raises(ValueError, match="below what the layout allows"):
        layer_targets(mod, 4, 0.52, 0.1)


def test_thresholds_keep_the_scheduled_fraction_and_the_floor_holds():
    mod = MoDConfig(routed_layers="1,3")
    ctl = ComputeTargetController(mod, 4, ComputeTargetConfig(target=0.55, warmup_steps=4))
    assert mod.load_loss_layer_coeffs == {1: 0.0, 3: 0.0}  # the load loss sets no count here
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(20000, generator=gen)
    kept = {1: 1.0, 3: 1.0}
    for _ in range(40):
        quantiles = logit_quantiles(sample).tolist()
        thresholds = ctl.update(kept, {1: quantiles, 3: quantiles})
        kept = {
            j: float((sample >= gate_threshold_logit(p)).float().mean()) if p > 0 else 1.0
            for j, p in thresholds.items()
        }
        assert all(v >= 0.1 - 0.01 for v in kept.values())
        if ctl.ramp_start:
            # Never faster than the schedule allows.
            assert all(v >= ctl.scheduled[j] - 0.02 for j, v in kept.items())
    assert (2 + sum(kept.values())) / 4 == pytest.approx(0.55, abs=0.01)
    assert min(kept.values()) >= 0.09  # target 0.55 needs kept 0.1 per layer: the floor


def test_drift_is_extrapolated():
    mod = MoDConfig(routed_layers=[1])
    ctl = ComputeTargetController(
        mod, 2, ComputeTargetConfig(target=0.75, warmup_steps=0, drift_smoothing=1.0)
    )
    shift = 0.0
    kept = 1.0
    for _ in range(30):
        q = _normal_quantiles(shift)
        p = ctl.update({1: kept}, {1: q})[1]
        shift -= 0.3  # every logit falls by 0.3 per step, as under a consistent Adam push
        logits = torch.randn(20000, generator=torch.Generator().manual_seed(5)) + shift
        kept = float((logits >= gate_threshold_logit(p)).float().mean()) if p > 0 else 1.0
    assert kept == pytest.approx(0.5, abs=0.03)  # kept 0.5 of layer 1 is c_eff 0.75


def test_tied_logits_keep_everything_until_ready():
    mod = MoDConfig(routed_layers=[1])
    ctl = ComputeTargetController(mod, 2, ComputeTargetConfig(target=0.6))
    tied = [2.0] * QUANTILE_GRID
    for _ in range(5):
        assert ctl.update({1: 1.0}, {1: tied}) == {1: 0.0}
    assert ctl.ramp_start == {}


def test_a_layer_that_starts_below_one_holds_its_fraction_until_ready():
    """A calibrated checkpoint starts at kept 0.8: the controller holds 0.8, it does not reset
    the layer to keep-all while it waits for readiness."""
    mod = MoDConfig(routed_layers=[1])
    ctl = ComputeTargetController(mod, 2, ComputeTargetConfig(target=0.6))
    sample = torch.randn(20000, generator=torch.Generator().manual_seed(2))
    quantiles = logit_quantiles(sample).tolist()
    p = ctl.update({1: 0.8}, {1: quantiles})[1]
    assert ctl.ramp_start == {}
    assert float((sample >= gate_threshold_logit(p)).float().mean()) == pytest.approx(0.8, abs=0.01)


def test_state_round_trip_through_json_and_errors():
    mod = MoDConfig(routed_layers="1,3")
    cfg = ComputeTargetConfig(target=0.8, warmup_steps=3)
    ctl = ComputeTargetController(mod, 4, cfg)
    for seed in range(6):
        q = _normal_quantiles(seed=seed, scale=2.0)
        ctl.update({"1": 0.9, "3": 0.8}, {"1": q, "3": q})
    state = json.loads(json.dumps(ctl.state_dict()))
    other_mod = MoDConfig(routed_layers="1,3")
    other = ComputeTargetController(other_mod, 4, cfg)
    other.load_state_dict(state)
    assert other_mod.layer_thresholds == mod.layer_thresholds
    q = _normal_quantiles(seed=9, scale=2.0)
    assert other.update({1: 0.8, 3: 0.7}, {1: q, 3: q}) == ctl.update(
        {1: 0.8, 3: 0.7}, {1: q, 3: q}
    )
    with pytest.raises(ValueError, match="routed layers"):
        ComputeTargetController(MoDConfig(routed_layers="1"), 4, cfg).load_state_dict(state)
    with pytest.raises(ValueError, match="earlier load-loss controller"):
        other.load_state_dict({**state, "version": 1})
    with pytest.raises(KeyError, match="routed layer 3"):
        other.update({1: 0.5}, {1: q})
    with pytest.raises(ValueError, match="top-k"):
        ComputeTargetController(MoDConfig(routing="topk"), 4, cfg)
    assert math.isfinite(other.last["c_eff"])
