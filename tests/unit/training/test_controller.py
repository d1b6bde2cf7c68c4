"""The compute-target controller on a synthetic model of how routed layers respond.

The synthetic plant: each routed layer's router bias is trained by Adam (as the real routers
are); its kept fraction is ``Phi(b / 1.5)`` (token logits spread around the bias), measured each
step on 256 tokens (noise). The bias gradient is the load loss's push ``coeff * F * dG/db`` minus
the language model's pull toward keeping, ``lm_j * F * (1.2 - F)``: the pull vanishes with
``F`` (skipped tokens get no LM gradient, so a collapsed layer stays collapsed) and differs 7x
between layers. The plant reproduces the cliff of a fixed coefficient (checked below), which is
what the controller must get around.
"""

from __future__ import annotations

import json
import math
import random

import pytest

from megatron_mod.config import MoDConfig
from megatron_mod.training.controller import ComputeTargetConfig, ComputeTargetController

NUM_LAYERS = 8  # every_other: layers 1, 3, 5, 7 routed, 4 dense
LM_PULL = (0.08, 0.04, 0.02, 0.012)


class SyntheticRouters:
    """Router biases under Adam, pushed by the load loss and pulled by the language model."""

    def __init__(self, routed, lr=0.1, seed=0, sigma=1.5, tokens=256):
        self.routed = list(routed)
        self.bias = dict.fromkeys(self.routed, 2.0)  # the converter's initial router bias
        self.m = dict.fromkeys(self.routed, 0.0)
        self.v = dict.fromkeys(self.routed, 0.0)
        self.pull = dict(zip(self.routed, LM_PULL))
        self.lr, self.sigma, self.tokens, self.t = lr, sigma, tokens, 0
        self.rng = random.Random(seed)

    def kept(self, layer) -> float:
        return 0.5 * (1.0 + math.erf(self.bias[layer] / self.sigma / math.sqrt(2.0)))

    def c_eff(self) -> float:
        return (NUM_LAYERS - len(self.routed) + sum(map(self.kept, self.routed))) / NUM_LAYERS

    def step(self, mod_config: MoDConfig) -> dict[int, float]:
        """One training step; returns the kept fractions measured on this step's tokens."""
        self.t += 1
        measured = {}
        for layer in self.routed:
            f = self.kept(layer)
            measured[layer] = sum(self.rng.random() < f for _ in range(self.tokens)) / self.tokens
            coeff = mod_config.layer_load_loss_coeff(layer)  # read at every step, as the layer does
            grad = coeff * f * 0.2 - self.pull[layer] * f * (1.2 - f)
            self.m[layer] = 0.9 * self.m[layer] + 0.1 * grad
            self.v[layer] = 0.999 * self.v[layer] + 0.001 * grad * grad
            m_hat = self.m[layer] / (1 - 0.9**self.t)
            v_hat = self.v[layer] / (1 - 0.999**self.t)
            self.bias[layer] -= self.lr * m_hat / (math.sqrt(v_hat) + 1e-8)
        return measured


def _train(mod_config, steps, controller=None, lr=0.1, seed=0):
    plant = SyntheticRouters(mod_config.routed_layer_indices(NUM_LAYERS), lr=lr, seed=seed)
    history = []
    for _ in range(steps):
        measured = plant.step(mod_config)
        if controller is not None:
            controller.update(measured)
        history.append((plant.c_eff(), min(map(plant.kept, plant.routed))))
    return history


def test_fixed_coefficient_is_a_cliff_on_the_synthetic_plant():
    # Without the controller: alpha 0.01 drifts back to dense; alpha 0.1 collapses a layer.
    small = _train(MoDConfig(load_loss_coeff=0.01), 200)
    assert small[-1][0] > 0.99
    large = _train(MoDConfig(load_loss_coeff=0.1), 200)
    assert large[-1][1] < 0.05  # one routed layer below 5 % kept
    assert large[-1][0] > 0.7  # while the model as a whole saved little


@pytest.mark.parametrize("lr", [0.05, 0.2])
@pytest.mark.parametrize("target", [0.8, 0.6])
def test_target_reached_within_005_in_under_100_steps_and_held_above_the_floor(target, lr):
    mod_config = MoDConfig(load_loss_coeff=0.01)
    config = ComputeTargetConfig(target=target, warmup_steps=30, floor=0.1)
    controller = ComputeTargetController(mod_config, NUM_LAYERS, config)
    history = _train(mod_config, 300, controller, lr=lr)
    reached = next(i for i, (c, _) in enumerate(history) if abs(c - target) <= 0.05)
    assert reached < 100
    assert all(abs(c - target) <= 0.05 for c, _ in history[reached:]), "left the band"
    assert min(low for _, low in history) >= config.floor  # no routed layer below its floor
    assert controller.last["target"] == target
    # The coefficients the layers read are alpha times the controller's multipliers.
    coeffs = controller.coefficients()
    assert set(coeffs) == {1, 3, 5, 7}
    assert coeffs[1] == pytest.approx(0.01 * mod_config.load_loss_layer_coeffs[1])


def test_warmup_ramps_the_target_from_one():
    config = ComputeTargetConfig(target=0.6, warmup_steps=40)
    controller = ComputeTargetController(MoDConfig(load_loss_coeff=0.01), NUM_LAYERS, config)
    assert controller.target_at(0) == 1.0
    assert controller.target_at(20) == pytest.approx(0.8)
    assert controller.target_at(40) == controller.target_at(400) == 0.6


def test_a_layer_at_its_floor_is_not_pushed_and_the_others_are():
    mod_config = MoDConfig(load_loss_coeff=0.01)
    controller = ComputeTargetController(
        mod_config, NUM_LAYERS, ComputeTargetConfig(target=0.7, floor=0.1, floor_margin=0.1)
    )
    coeffs = controller.update({1: 0.9, 3: 0.1, 5: 0.15, "7": 0.9})  # string keys accepted
    assert coeffs[3] == 0.0  # at the floor: no push at all
    assert coeffs[5] == pytest.approx(0.5 * coeffs[1])  # halfway up the margin: half the push
    assert coeffs[1] == coeffs[7] > 0
    assert controller.last["guarded_layers"] == [3, 5]


def test_excess_compute_raises_the_coefficient_and_a_deficit_lowers_it():
    mod_config = MoDConfig(load_loss_coeff=0.01)
    controller = ComputeTargetController(
        mod_config, NUM_LAYERS, ComputeTargetConfig(target=0.75, warmup_steps=0)
    )
    # The dual variable (the integral) rises while compute is above the target and falls while
    # below; the multiplier follows (P and D terms add a jump when the excess changes sign).
    integrals, multipliers = [], []
    for kept in [0.9] * 5 + [0.3] * 5:
        multipliers.append(controller.update(dict.fromkeys((1, 3, 5, 7), kept))[1])
        integrals.append(controller.integral)
    assert integrals[:5] == sorted(integrals[:5]) and integrals[0] > 0
    assert integrals[5:] == sorted(integrals[5:], reverse=True)
    assert multipliers[0] > 1.0 and max(multipliers[5:]) < 1.0 < min(multipliers[:5])
    for _ in range(200):  # bounded: no wind-up past max_multiplier
        controller.update(dict.fromkeys((1, 3, 5, 7), 1.0))
    assert mod_config.load_loss_layer_coeffs[1] == pytest.approx(controller.config.max_multiplier)


def test_state_dict_round_trip_continues_the_same_trajectory():
    def fresh():
        mod_config = MoDConfig(load_loss_coeff=0.01)
        config = ComputeTargetConfig(target=0.7, warmup_steps=20)
        return mod_config, ComputeTargetController(mod_config, NUM_LAYERS, config)

    mod_a, ctl_a = fresh()
    rng = random.Random(3)
    inputs = [{j: rng.uniform(0.2, 1.0) for j in (1, 3, 5, 7)} for _ in range(60)]
    for stats in inputs[:40]:
        ctl_a.update(stats)
    state = json.loads(json.dumps(ctl_a.state_dict()))  # it must survive a JSON checkpoint
    mod_b, ctl_b = fresh()
    ctl_b.load_state_dict(state)
    assert mod_b.load_loss_layer_coeffs == mod_a.load_loss_layer_coeffs
    for stats in inputs[40:]:
        assert ctl_b.update(stats) == ctl_a.update(stats)
    assert ctl_b.state_dict() == ctl_a.state_dict()
    _, other = fresh()
    bad = dict(state, routed_layers=[1, 3])
    with pytest.raises(ValueError, match="routed layers"):
        other.load_state_dict(bad)


def test_bad_settings_name_what_to_change():
    with pytest.raises(ValueError, match="mod-load-loss-coeff"):
        ComputeTargetController(
            MoDConfig(load_loss_coeff=0.0), NUM_LAYERS, ComputeTargetConfig(target=0.7)
        )
    # 4 dense of 8 layers and a floor of 0.1 on the 4 routed ones: c_eff >= 0.55.
    with pytest.raises(ValueError, match="c_eff >= 0.55"):
        ComputeTargetController(
            MoDConfig(load_loss_coeff=0.01), NUM_LAYERS, ComputeTargetConfig(target=0.5)
        )
    with pytest.raises(ValueError, match="ComputeTargetConfig.target"):
        ComputeTargetConfig(target=1.5)
    with pytest.raises(ValueError, match="floor"):
        ComputeTargetConfig(target=0.7, floor=1.0)
    controller = ComputeTargetController(
        MoDConfig(load_loss_coeff=0.01), NUM_LAYERS, ComputeTargetConfig(target=0.7)
    )
    with pytest.raises(KeyError, match="routed layer 7"):
        controller.update({1: 0.5, 3: 0.5, 5: 0.5})
