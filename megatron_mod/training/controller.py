"""Compute you can ask for: steer the routed layers' load-loss coefficients to a target ``c_eff``.

A fixed load-loss coefficient alpha is a cliff, not a dial: too small and the routers drift back
to keeping every token, a little larger and layers collapse to ~0 kept, irreversibly (a skipped
token gets no language-model gradient through its gate). ``--mod-target-compute X`` instead asks
for ``c_eff = X`` (the fraction of (token, layer) pairs computed, all layers counted, dense ones
as 1) and lets :class:`ComputeTargetController` find the coefficient that gets there:

* **dual ascent** on the excess compute: one price ``lambda`` for a kept token, the same for every
  routed layer (each layer then skips where skipping costs it least language-model loss), raised
  while ``c_eff`` is above the target and lowered while below. It moves in log space (a
  coefficient's useful range spans orders of magnitude, and with Adam it sets the *balance*
  between the two gradients, not a step size), as a proportional-integral-derivative update:
  the integral finds the balance, the proportional term reacts at once, and the derivative term
  (on the smoothed change of the excess) brakes before the target is crossed, since Adam's
  momentum keeps the routers moving for ~10 steps after the push stops. It is bounded to
  ``[min_multiplier, max_multiplier]`` times the configured alpha so that it cannot wind up;
* a **warm-up ramp** of the target from 1.0 (the converted model computes everything) down to
  ``X`` over ``warmup_steps`` steps, so the routers are not shocked at step 0;
* a **per-layer floor**: a routed layer whose kept fraction nears ``floor`` has its coefficient
  scaled down (to 0 at the floor itself), so the load loss stops pushing it and the language-model
  gradient can keep it alive; the other layers take up the missing savings.

The controller writes each routed layer's multiplier into
``mod_config.load_loss_layer_coeffs``; the MoD layers read ``mod_config.layer_load_loss_coeff(i)``
(alpha times that multiplier) at every forward, so the new coefficients act from the next step.
Its state (:meth:`state_dict`, plain numbers) belongs in the checkpoint.

The default gains were tuned on the synthetic model of router dynamics in
``tests/unit/training/test_controller.py`` (Adam on each router's bias at learning rates
0.05-0.2, a language-model pull that differs 7x between layers, 256-token measurement noise):
targets 0.6-0.9 are reached within +-0.05 in under 100 steps and held, with no layer below its
floor.

**On a real model it is not yet enough** (SmolLM2-135M, ``examples/reproduce_smollm2.sh --budget
cpu``: target 0.75, routers zero-initialised, Adam at lr 1e-4). The routers did not lower their
kept fractions gradually. Each layer fell off a cliff: with zero router weights, once the load
loss dominates a router's gradient, every token's logit moves by about ``lr * ||h||_1`` per
step, so all of the layer's tokens cross p together. Two layers went from > 90 % to < 10 % kept
in two steps, faster than the guard can react, and Adam's momentum carried them on to 0. The run
ended at c_eff 0.675 with 10 of 15 routed layers near 0: whole layers dropped, the floor not
held. At a 10x router learning rate the same happened in 15 steps; at 0.1x no router moved in
18 steps while the multiplier wound up 40x.

Usage in a training loop::

    controller = ComputeTargetController(mod_config, num_layers, ComputeTargetConfig(target=0.75))
    for step in ...:
        metrics = train_step()                       # per routed layer kept fraction F_j
        controller.update({j: metrics.kept[j] for j in routed})
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from megatron_mod.config import MoDConfig

__all__ = ["ComputeTargetConfig", "ComputeTargetController"]


@dataclass
class ComputeTargetConfig:
    """Settings of the compute-target controller (``--mod-target-compute`` and friends)."""

    target: float
    """Target c_eff over all layers (dense layers count 1), in (0, 1]."""

    warmup_steps: int = 50
    """Steps over which the target ramps linearly from 1.0 down to ``target`` (0: no ramp)."""

    floor: float = 0.1
    """No routed layer is pushed below this kept fraction."""

    floor_margin: float = 0.15
    """Above ``floor + floor_margin`` a layer gets the full coefficient; it falls to 0 at floor."""

    integral_rate: float = 0.3
    """Integral gain: log-multiplier change per step per unit of excess routed kept fraction."""

    proportional_gain: float = 20.0
    """Proportional gain: log-multiplier offset per unit of excess routed kept fraction."""

    derivative_gain: float = 60.0
    """Damping: log-multiplier offset per unit of the excess's change over one step (smoothed)."""

    initial_multiplier: float = 1.0
    """Starting multiplier of alpha (1: start from the configured --mod-load-loss-coeff)."""

    min_multiplier: float = 1e-3
    """Lower bound of the multiplier of alpha."""

    max_multiplier: float = 1e3
    """Upper bound of the multiplier of alpha."""

    def __post_init__(self):
        def need(ok: bool, name: str, allowed: str):
            if not ok:
                raise ValueError(
                    f"ComputeTargetConfig.{name}={getattr(self, name)!r} is invalid; {allowed}"
                )

        need(0.0 < self.target <= 1.0, "target", "allowed: 0 < target <= 1")
        need(self.warmup_steps >= 0, "warmup_steps", "allowed: an int >= 0")
        need(0.0 <= self.floor < 1.0, "floor", "allowed: 0 <= floor < 1")
        need(self.floor_margin > 0.0, "floor_margin", "allowed: > 0")
        need(self.integral_rate > 0.0, "integral_rate", "allowed: > 0")
        need(self.proportional_gain >= 0.0, "proportional_gain", "allowed: >= 0")
        need(self.derivative_gain >= 0.0, "derivative_gain", "allowed: >= 0")
        need(self.min_multiplier > 0.0, "min_multiplier", "allowed: > 0")
        need(self.max_multiplier >= self.min_multiplier, "max_multiplier", ">= min_multiplier")
        need(
            self.min_multiplier <= self.initial_multiplier <= self.max_multiplier,
            "initial_multiplier",
            "allowed: between min_multiplier and max_multiplier",
        )


class ComputeTargetController:
    """Adapts every routed layer's load-loss multiplier so that training reaches a target c_eff.

    Args:
        mod_config: the MoD config the model's layers read their coefficient from (updated in
            place: ``load_loss_layer_coeffs``). Its ``load_loss_coeff`` (alpha) must be > 0.
        num_layers: layers of the whole model (dense ones count in c_eff).
        config: controller settings.

    Raises:
        ValueError: alpha is 0, or the target cannot be reached without pushing routed layers
            below the floor.
    """

    def __init__(self, mod_config: MoDConfig, num_layers: int, config: ComputeTargetConfig):
        if mod_config.load_loss_coeff <= 0:
            raise ValueError(
                "--mod-target-compute needs --mod-load-loss-coeff > 0: the controller scales "
                "that coefficient per layer"
            )
        self.mod_config = mod_config
        self.config = config
        self.num_layers = num_layers
        self.routed = mod_config.routed_layer_indices(num_layers)
        self.num_dense = num_layers - len(self.routed)
        lowest = (self.num_dense + config.floor * len(self.routed)) / num_layers
        if config.target < lowest - 1e-9:
            raise ValueError(
                f"--mod-target-compute {config.target} is below what the layout allows: "
                f"{self.num_dense} dense of {num_layers} layers and a floor of {config.floor} "
                f"kept per routed layer give c_eff >= {lowest:.4f}; route more layers, lower "
                f"the floor or raise the target"
            )
        self.step = 0
        self.integral = math.log(config.initial_multiplier)
        self.log_multiplier = self.integral
        self.prev_excess: float | None = None
        self.slope = 0.0
        self.last: dict[str, Any] = {}
        self._write(dict.fromkeys(self.routed, 1.0))

    # -- the control law

    def target_at(self, step: int) -> float:
        """The (ramped) target c_eff at ``step``."""
        warmup = self.config.warmup_steps
        if warmup == 0 or step >= warmup:
            return self.config.target
        return 1.0 + (self.config.target - 1.0) * step / warmup

    def _guard(self, kept: float) -> float:
        """1 well above the floor, falling linearly to 0 at the floor."""
        return min(max((kept - self.config.floor) / self.config.floor_margin, 0.0), 1.0)

    def _write(self, guards: Mapping[int, float]) -> None:
        multiplier = math.exp(self.log_multiplier)
        coeffs = self.mod_config.load_loss_layer_coeffs
        for layer in self.routed:
            coeffs[layer] = multiplier * guards[layer]

    def update(self, step_stats: Mapping[int, float] | Mapping[str, Any]) -> dict[int, float]:
        """Take one training step's kept fractions and set the next step's coefficients.

        Args:
            step_stats: kept fraction F_j of every routed layer this step (reduced over the
                data-parallel ranks, as the trainer logs it), as ``{layer: F_j}`` or as
                ``{"kept": {layer: F_j}}``; layer keys may be ints or strings.

        Returns:
            The new per-layer multipliers of alpha (also written to the MoD config).

        Raises:
            KeyError: a routed layer is missing from ``step_stats``.
        """
        kept_in = step_stats.get("kept", step_stats) if isinstance(step_stats, Mapping) else None
        kept: dict[int, float] = {}
        for layer in self.routed:
            value = kept_in.get(layer, kept_in.get(str(layer)))
            if value is None:
                raise KeyError(
                    f"compute-target controller: no kept fraction for routed layer {layer} "
                    f"(got layers {sorted(kept_in)})"
                )
            kept[layer] = float(value)
        c_eff = (self.num_dense + sum(kept.values())) / self.num_layers
        target = self.target_at(self.step)
        # Excess in units of the routed layers' mean kept fraction, so the gains do not depend
        # on how many layers are dense.
        excess = (c_eff - target) * self.num_layers / len(self.routed)
        lo, hi = math.log(self.config.min_multiplier), math.log(self.config.max_multiplier)
        self.integral = min(max(self.integral + self.config.integral_rate * excess, lo), hi)
        if self.prev_excess is not None:
            self.slope = 0.7 * self.slope + 0.3 * (excess - self.prev_excess)
        self.prev_excess = excess
        control = (
            self.integral
            + self.config.proportional_gain * excess
            + self.config.derivative_gain * self.slope
        )
        self.log_multiplier = min(max(control, lo), hi)
        guards = {layer: self._guard(kept[layer]) for layer in self.routed}
        self._write(guards)
        self.step += 1
        self.last = {
            "c_eff": c_eff,
            "target": target,
            "multiplier": math.exp(self.log_multiplier),
            "guarded_layers": [layer for layer, g in guards.items() if g < 1.0],
        }
        return {layer: self.mod_config.load_loss_layer_coeffs[layer] for layer in self.routed}

    def coefficients(self) -> dict[int, float]:
        """The effective load-loss coefficient (alpha times multiplier) of each routed layer."""
        return {layer: self.mod_config.layer_load_loss_coeff(layer) for layer in self.routed}

    # -- checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers to store with the checkpoint (JSON-serialisable)."""
        return {
            "step": self.step,
            "integral": self.integral,
            "log_multiplier": self.log_multiplier,
            "prev_excess": self.prev_excess,
            "slope": self.slope,
            "multipliers": {str(k): self.mod_config.load_loss_layer_coeffs[k] for k in self.routed},
            "target": self.config.target,
            "routed_layers": list(self.routed),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the multipliers go back into the MoD config).

        Raises:
            ValueError: the state belongs to another routed-layer layout.
        """
        if list(state["routed_layers"]) != self.routed:
            raise ValueError(
                f"compute-target controller state is for routed layers {state['routed_layers']}, "
                f"this model routes {self.routed}"
            )
        self.step = int(state["step"])
        self.integral = float(state["integral"])
        self.log_multiplier = float(state["log_multiplier"])
        prev = state.get("prev_excess")
        self.prev_excess = None if prev is None else float(prev)
        self.slope = float(state.get("slope", 0.0))
        for key, value in state["multipliers"].items():
            self.mod_config.load_loss_layer_coeffs[int(key)] = float(value)
