"""Compute you can ask for: steer each routed layer's threshold so its kept fraction follows a plan.

``--mod-target-compute X`` asks for ``c_eff = X`` (the fraction of (token, layer) pairs computed,
all layers counted, dense ones as 1). A fixed load-loss coefficient cannot deliver that on a
pretrained model: it is a cliff, not a dial. With a pushed router, every token's logit moves by
about ``lr * ||h||_1`` per Adam step, so a layer's tokens cross the threshold together, and
layers collapse one at a time (SmolLM2-135M: two layers from > 90 % to < 10 % kept in two steps;
a 4-layer LLaMA at lr 2e-3: both routed layers at 0 kept). Steering the load-loss coefficient
(the controller this one replaces) only changes how hard the routers are pushed, not where the
tokens end up.

:class:`ComputeTargetController` instead decides *how many* tokens each routed layer keeps and
leaves *which* tokens to the router:

* every routed layer has a **kept-fraction schedule**, from what it kept at the first step
  (1.0 for a freshly converted model) down to its final target over ``warmup_steps`` steps,
  never falling faster than ``max_drop_per_step`` and never below ``floor``;
* after each step the layer's **threshold** is placed at the quantile of its own router logits
  (recorded by the layer, averaged over micro-batches and ranks) that keeps the next step's
  scheduled fraction: ``p_j = sigmoid(Q_j(1 - s_j))``, written into
  ``mod_config.layer_thresholds``, which the layers read at every forward. A threshold that
  follows the logits cannot be outrun by them: a router whose logits all move together keeps
  the same tokens as before;
* the logits move between the step that measured them and the step that uses the threshold
  (by about ``lr * ||x||_1`` for a consistently pushed router, under Adam whatever the push's
  size), so the threshold is **extrapolated by the drift** of that quantile over the last step
  (smoothed), and a small **integral trim** (in quantile units, bounded) removes what bias is
  left.

The routers still learn from the language-model gradient through the gate (with
``--mod-gate straight_through`` the router of a kept token receives ``<dL/dh', layer(h) - h>``:
how much that token's update helps), which orders the tokens. The load-reducing loss would set
no count here, only drag every logit of a layer down together (Adam turns even a tiny consistent
push into a full ``lr``-sized step), so the controller sets the steered layers' load-loss
multipliers to 0 (``mod_config.load_loss_layer_coeffs``); the paper's fixed-alpha recipe is the
run without ``--mod-target-compute``.

Per-layer targets: uniform over the routed layers, or shaped like ``mod_config.layer_kept_targets``
when a calibration (``tools/calibrate_routers.py``) chose them: each layer skips in proportion
to what the calibration gave it, scaled so that the mean meets ``X``.

A freshly converted checkpoint has zero router weights: every token of a layer has the same
logit, so no threshold can separate them, and for the first steps the logits' spread across
tokens is smaller than the distance they all move in one step. A threshold placed there would
keep everything or nothing depending on the next update's sign (measured: 2 % kept in the step
after the weights first moved). So a layer stays at "keep everything" until it is **ready**: its
logits' 10-90 % width has exceeded ``ready_ratio`` times the largest per-step drift of their
median over the last ``ready_steps`` steps, ``ready_steps`` steps in a row; its ramp starts
then. The schedule's start is measured, not assumed, so a calibrated checkpoint that already
skips starts from what it skips (and is ready at once).

Its state (:meth:`state_dict`, plain numbers) belongs in the checkpoint, and the thresholds are
part of the MoD config every checkpoint records, so an export serves with them.

Usage in a training loop::

    controller = ComputeTargetController(mod_config, num_layers, ComputeTargetConfig(target=0.75))
    for step in ...:
        result = train_step()                        # kept fraction and logit quantiles per layer
        controller.update(result.kept_fraction, result.logit_quantiles)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from megatron_mod.config import MoDConfig

__all__ = ["ComputeTargetConfig", "ComputeTargetController", "layer_targets"]

_STATE_VERSION = 2  # 1 was the load-loss coefficient controller


@dataclass
class ComputeTargetConfig:
    """Settings of the compute-target controller (``--mod-target-compute`` and friends)."""

    target: float
    """Target c_eff over all layers (dense layers count 1), in (0, 1]."""

    warmup_steps: int = 50
    """Steps over which each layer's kept fraction is ramped from its start to its target."""

    floor: float = 0.1
    """No routed layer is scheduled (or steered) below this kept fraction."""

    max_drop_per_step: float = 0.05
    """A layer's scheduled kept fraction falls by at most this much per step."""

    trim_gain: float = 0.2
    """Integral gain: quantile trim per step per unit of (measured - scheduled) kept fraction."""

    drift_smoothing: float = 0.2
    """Weight of the newest step in the smoothed per-step drift of the threshold's quantile."""

    ready_ratio: float = 5.0
    """A layer is steered once its logits' 10-90 % width exceeds this many times their drift."""

    ready_steps: int = 3
    """...for this many consecutive steps (the drift of the last this-many steps counts)."""

    max_trim: float = 0.1
    """Bound of the integral trim, in quantile units."""

    def __post_init__(self):
        def need(ok: bool, name: str, allowed: str):
            if not ok:
                raise ValueError(
                    f"ComputeTargetConfig.{name}={getattr(self, name)!r} is invalid; {allowed}"
                )

        need(0.0 < self.target <= 1.0, "target", "allowed: 0 < target <= 1")
        need(self.warmup_steps >= 0, "warmup_steps", "allowed: an int >= 0")
        need(0.0 <= self.floor < 1.0, "floor", "allowed: 0 <= floor < 1")
        need(0.0 < self.max_drop_per_step <= 1.0, "max_drop_per_step", "allowed: (0, 1]")
        need(self.trim_gain >= 0.0, "trim_gain", "allowed: >= 0")
        need(0.0 <= self.max_trim < 1.0, "max_trim", "allowed: [0, 1)")
        need(0.0 <= self.drift_smoothing <= 1.0, "drift_smoothing", "allowed: [0, 1]")
        need(self.ready_ratio >= 0.0, "ready_ratio", "allowed: >= 0")
        need(self.ready_steps >= 1, "ready_steps", "allowed: an int >= 1")


def layer_targets(
    mod_config: MoDConfig, num_layers: int, target: float, floor: float
) -> dict[int, float]:
    """Final kept fraction of every routed layer for a target c_eff.

    Uniform, or shaped like ``mod_config.layer_kept_targets`` (a calibration's budgets): layer
    j keeps ``clip(1 - (1 - b_j) * scale, floor, 1)`` with ``scale`` chosen so that c_eff is
    ``target``.

    Raises:
        ValueError: the target is below what the layout allows with the floor.
    """
    routed = mod_config.routed_layer_indices(num_layers)
    dense = num_layers - len(routed)
    lowest = (dense + floor * len(routed)) / num_layers
    if target < lowest - 1e-9:
        raise ValueError(
            f"--mod-target-compute {target} is below what the layout allows: {dense} dense of "
            f"{num_layers} layers and a floor of {floor} kept per routed layer give c_eff >= "
            f"{lowest:.4f}; route more layers, lower the floor or raise the target"
        )
    mean_kept = (target * num_layers - dense) / len(routed)
    budgets = mod_config.layer_kept_targets
    if not all(layer in budgets for layer in routed) or all(budgets[j] >= 1.0 for j in routed):
        return dict.fromkeys(routed, min(max(mean_kept, floor), 1.0))

    def kept_at(scale: float) -> dict[int, float]:
        return {j: min(max(1.0 - (1.0 - budgets[j]) * scale, floor), 1.0) for j in routed}

    low, high = 0.0, 1.0
    while sum(kept_at(high).values()) / len(routed) > mean_kept and high < 1e6:
        high *= 2.0
    for _ in range(100):  # bisection: the mean kept fraction falls monotonically with scale
        mid = 0.5 * (low + high)
        if sum(kept_at(mid).values()) / len(routed) > mean_kept:
            low = mid
        else:
            high = mid
    return kept_at(high)


def _quantile(quantiles: Sequence[float], q: float) -> float:
    """Linear interpolation of a quantile function given at even probabilities 0..1."""
    position = min(max(q, 0.0), 1.0) * (len(quantiles) - 1)
    low = int(math.floor(position))
    high = min(low + 1, len(quantiles) - 1)
    weight = position - low
    return quantiles[low] * (1.0 - weight) + quantiles[high] * weight


def _sigmoid(logit: float) -> float:
    if logit >= 0:
        return 1.0 / (1.0 + math.exp(-logit))
    e = math.exp(logit)
    return e / (1.0 + e)


class ComputeTargetController:
    """Places every routed layer's threshold so that training follows a kept-fraction schedule.

    Args:
        mod_config: the MoD config the model's layers read their thresholds from (updated in
            place: ``layer_thresholds``).
        num_layers: layers of the whole model (dense ones count in c_eff).
        config: controller settings.

    Raises:
        ValueError: the target cannot be reached without pushing routed layers below the floor,
            or the model routes by top-k (its capacity is fixed by ``--mod-capacity``).
    """

    def __init__(self, mod_config: MoDConfig, num_layers: int, config: ComputeTargetConfig):
        if mod_config.routing != "threshold":
            raise ValueError(
                "--mod-target-compute steers threshold routing; top-k keeps --mod-capacity of "
                "every sequence by construction (set that instead)"
            )
        self.mod_config = mod_config
        self.config = config
        self.num_layers = num_layers
        self.routed = mod_config.routed_layer_indices(num_layers)
        self.num_dense = num_layers - len(self.routed)
        self.final = layer_targets(mod_config, num_layers, config.target, config.floor)
        self.step = 0
        self.start: dict[int, float] | None = None
        self.scheduled: dict[int, float] = {}
        self.trim = dict.fromkeys(self.routed, 0.0)
        self.drift = dict.fromkeys(self.routed, 0.0)
        self.previous_quantiles: dict[int, list[float]] = {}
        self.ramp_start: dict[int, int] = {}
        self.moves: dict[int, list[float]] = {j: [] for j in self.routed}
        self.ready_run = dict.fromkeys(self.routed, 0)
        self.last: dict[str, Any] = {}
        for j in self.routed:
            mod_config.load_loss_layer_coeffs[j] = 0.0

    # -- the schedule

    def _scheduled_at(self, step: int, previous: Mapping[int, float]) -> dict[int, float]:
        cfg = self.config
        out = {}
        for j in self.routed:
            if j not in self.ramp_start:
                out[j] = previous[j]  # not ready: hold
                continue
            elapsed = step - self.ramp_start[j]
            ramp = 1.0 if cfg.warmup_steps == 0 else min(elapsed / cfg.warmup_steps, 1.0)
            start = max(self.start[j], self.final[j])
            planned = start + (self.final[j] - start) * ramp
            out[j] = max(planned, previous[j] - cfg.max_drop_per_step, cfg.floor)
        return out

    # -- the control law

    def update(
        self,
        kept_fraction: Mapping[Any, float],
        logit_quantiles: Mapping[Any, Sequence[float]],
    ) -> dict[int, float]:
        """Take one training step's routing statistics and set the next step's thresholds.

        Args:
            kept_fraction: kept fraction F_j of every routed layer this step (reduced over the
                data-parallel ranks, as the trainer logs it); int or str layer keys.
            logit_quantiles: every routed layer's logit quantiles at even probabilities 0..1
                (``StepResult.logit_quantiles``).

        Returns:
            The new per-layer gate thresholds (also written to the MoD config).

        Raises:
            KeyError: a routed layer is missing from the statistics.
        """
        kept = {j: float(_lookup(kept_fraction, j, "kept fraction")) for j in self.routed}
        quantiles = {j: list(_lookup(logit_quantiles, j, "logit quantiles")) for j in self.routed}
        cfg = self.config
        if self.start is None:
            self.start = dict(kept)
            self.scheduled = dict(kept)
        for j in self.routed:
            spread = quantiles[j][-1] - quantiles[j][0]
            # Tied logits (zero router weights) keep everything whatever the threshold: no
            # error to integrate until the router has a direction.
            if spread > 1e-6 and j in self.mod_config.layer_thresholds:
                error = kept[j] - self.scheduled[j]
                self.trim[j] = min(max(self.trim[j] + cfg.trim_gain * error, -cfg.max_trim),
                                   cfg.max_trim)  # fmt: skip
        measured_c_eff = (self.num_dense + sum(kept.values())) / self.num_layers
        scheduled_c_eff = (self.num_dense + sum(self.scheduled.values())) / self.num_layers
        self.step += 1
        for j in self.routed:
            previous = self.previous_quantiles.get(j)
            if j in self.ramp_start or previous is None:
                continue
            width = _quantile(quantiles[j], 0.9) - _quantile(quantiles[j], 0.1)
            moves = self.moves[j]
            moves.append(abs(_quantile(quantiles[j], 0.5) - _quantile(previous, 0.5)))
            del moves[: -cfg.ready_steps]
            calm = width > 1e-4 and width > cfg.ready_ratio * max(moves)
            self.ready_run[j] = self.ready_run[j] + 1 if calm else 0
            if self.ready_run[j] >= cfg.ready_steps:
                self.ramp_start[j] = self.step - 1
        self.scheduled = self._scheduled_at(self.step, self.scheduled)
        thresholds = {}
        for j in self.routed:
            q = min(1.0 - self.scheduled[j] + self.trim[j], 1.0 - cfg.floor)
            previous = self.previous_quantiles.get(j)
            if previous is not None and previous[-1] - previous[0] > 1e-6:
                shift = _quantile(quantiles[j], q) - _quantile(previous, q)
                a = cfg.drift_smoothing
                self.drift[j] = (1.0 - a) * self.drift[j] + a * shift
            self.previous_quantiles[j] = quantiles[j]
            if self.scheduled[j] >= 1.0 or q <= 0.0 or quantiles[j][-1] - quantiles[j][0] <= 1e-6:
                thresholds[j] = 0.0  # keep everything
                continue
            if j not in self.ramp_start:
                # Not ready: hold the fraction the layer started with (a calibrated checkpoint
                # may start below 1), without drift, which is not measured yet.
                thresholds[j] = _sigmoid(_quantile(quantiles[j], q))
                continue
            thresholds[j] = _sigmoid(_quantile(quantiles[j], q) + self.drift[j])
        self.mod_config.layer_thresholds.update(thresholds)
        self.last = {
            "c_eff": measured_c_eff,
            "target": scheduled_c_eff,
            "next_target": (self.num_dense + sum(self.scheduled.values())) / self.num_layers,
            "final_target": self.config.target,
            "scheduled": dict(self.scheduled),
            "thresholds": dict(thresholds),
        }
        return thresholds

    def log_line(self) -> str:
        """`` compute target | c_eff 0.912 (scheduled 0.905, next 0.898) | kept 1:0.82 …``."""
        last = self.last
        if not last:
            return " compute target | no step yet"
        sched = " ".join(f"{j}:{v:.2f}" for j, v in sorted(last["scheduled"].items()))
        thr = " ".join(f"{j}:{v:.3f}" for j, v in sorted(last["thresholds"].items()))
        return (
            f" compute target | c_eff {last['c_eff']:.3f} (scheduled {last['target']:.3f}, "
            f"next {last['next_target']:.3f}, final {last['final_target']:.3f}) | "
            f"next kept {sched} | thresholds {thr}"
        )

    def write_scalars(self, writer, iteration: int) -> None:
        """The schedule and thresholds to TensorBoard (``mod/target_c_eff``, per layer)."""
        if writer is None or not self.last:
            return
        writer.add_scalar("mod/target_c_eff", self.last["target"], iteration)
        for j in self.routed:
            tag = f"layer_{j:02d}"
            writer.add_scalar(f"mod/scheduled_kept/{tag}", self.last["scheduled"][j], iteration)
            writer.add_scalar(f"mod/threshold/{tag}", self.last["thresholds"][j], iteration)

    # -- checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers to store with the checkpoint (JSON-serialisable)."""
        return {
            "version": _STATE_VERSION,
            "step": self.step,
            "start": None if self.start is None else {str(k): v for k, v in self.start.items()},
            "scheduled": {str(k): v for k, v in self.scheduled.items()},
            "trim": {str(k): v for k, v in self.trim.items()},
            "drift": {str(k): v for k, v in self.drift.items()},
            "previous_quantiles": {str(k): v for k, v in self.previous_quantiles.items()},
            "ramp_start": {str(k): v for k, v in self.ramp_start.items()},
            "moves": {str(k): v for k, v in self.moves.items()},
            "ready_run": {str(k): v for k, v in self.ready_run.items()},
            "thresholds": {
                str(j): self.mod_config.layer_thresholds[j]
                for j in self.routed
                if j in self.mod_config.layer_thresholds
            },
            "final": {str(k): v for k, v in self.final.items()},
            "target": self.config.target,
            "routed_layers": list(self.routed),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the thresholds go back into the MoD config).

        Raises:
            ValueError: the state belongs to another routed-layer layout or controller version.
        """
        if state.get("version") != _STATE_VERSION:
            raise ValueError(
                "the checkpoint's compute-target state was written by the earlier load-loss "
                "controller; start a new run from it (--load it with a new --save) instead of "
                "resuming"
            )
        if list(state["routed_layers"]) != self.routed:
            raise ValueError(
                f"compute-target controller state is for routed layers {state['routed_layers']}, "
                f"this model routes {self.routed}"
            )
        self.step = int(state["step"])
        start = state.get("start")
        self.start = None if start is None else {int(k): float(v) for k, v in start.items()}
        self.scheduled = {int(k): float(v) for k, v in state["scheduled"].items()}
        self.trim = {int(k): float(v) for k, v in state["trim"].items()}
        self.drift = {int(k): float(v) for k, v in state["drift"].items()}
        self.previous_quantiles = {
            int(k): [float(x) for x in v] for k, v in state["previous_quantiles"].items()
        }
        self.ramp_start = {int(k): int(v) for k, v in state["ramp_start"].items()}
        self.moves = {int(k): [float(x) for x in v] for k, v in state["moves"].items()}
        self.ready_run = {int(k): int(v) for k, v in state["ready_run"].items()}
        for key, value in state["thresholds"].items():
            self.mod_config.layer_thresholds[int(key)] = float(value)


def _lookup(values: Mapping[Any, Any], layer: int, what: str):
    value = values.get(layer, values.get(str(layer)))
    if value is None:
        raise KeyError(
            f"compute-target controller: no {what} for routed layer {layer} "
            f"(got layers {sorted(values, key=str)})"
        )
    return value
