"""Mixture-of-Depths configuration shared by the model, trainer, converters and CLIs."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

ROUTING_CHOICES = ("threshold", "topk")
GATE_CHOICES = ("scale", "straight_through")
ROUTED_LAYER_KEYWORDS = ("all", "every_other")


def _fail(name: str, value, allowed: str) -> None:
    raise ValueError(f"MoDConfig.{name}={value!r} is invalid; allowed: {allowed}")


@dataclass
class MoDConfig:
    """How tokens are routed around transformer layers (MoDification; docs/design.md)."""

    routing: str = "threshold"
    """`threshold`: keep a token iff sigmoid(router logit) >= threshold; `topk`: keep ceil(c*S)."""

    threshold: float = 0.5
    """p in [0, 1] for threshold routing; also usable at inference time as a speed/quality knob."""

    capacity: float = 0.125
    """c in (0, 1]: fraction of each sequence kept per routed layer under top-k routing."""

    gate: str = "scale"
    """`scale`: h + g*(layer(h)-h); `straight_through`: forward equals layer(h), grad reaches g."""

    routed_layers: str | list[int] = "every_other"
    """`all`, `every_other` (0-based odd layers) or an explicit list / comma string of indices."""

    load_loss_coeff: float = 0.01
    """alpha of the layer load-reducing loss R = alpha * sum_j F_j * G_j (0 disables it)."""

    router_init_bias: float = 2.0
    """Router bias at initialisation; +2 keeps every token (g ~ 0.88) at the start."""

    router_init_std: float = 0.02
    """Init std of the logit per unit RMS of h: w ~ N(0, std^2 / hidden); 0 gives w = 0."""

    load_loss_layer_coeffs: dict[int, float] = field(default_factory=dict)
    """Optional per-layer multipliers of alpha, keyed by global 0-based layer index."""

    topk_decode_threshold: float | None = None
    """Top-k only: gate threshold for token-by-token decoding (set by training; None: unknown)."""

    compact_length_multiple: int = 64
    """Round each routed layer's compact (kept-token) length up to this; keeps GEMMs aligned."""

    def __post_init__(self):
        if self.routing not in ROUTING_CHOICES:
            _fail("routing", self.routing, " | ".join(ROUTING_CHOICES))
        if not isinstance(self.threshold, (int, float)) or not 0.0 <= self.threshold <= 1.0:
            _fail("threshold", self.threshold, "a float p with 0 <= p <= 1")
        if not isinstance(self.capacity, (int, float)) or not 0.0 < self.capacity <= 1.0:
            _fail("capacity", self.capacity, "a float c with 0 < c <= 1")
        if self.gate not in GATE_CHOICES:
            _fail("gate", self.gate, " | ".join(GATE_CHOICES))
        if not isinstance(self.load_loss_coeff, (int, float)) or self.load_loss_coeff < 0:
            _fail("load_loss_coeff", self.load_loss_coeff, "a float alpha >= 0")
        if self.router_init_std < 0:
            _fail("router_init_std", self.router_init_std, "a float >= 0")
        if self.topk_decode_threshold is not None and not (
            isinstance(self.topk_decode_threshold, (int, float))
            and 0.0 <= self.topk_decode_threshold <= 1.0
        ):
            _fail("topk_decode_threshold", self.topk_decode_threshold, "None or a float in [0, 1]")
        if (
            isinstance(self.compact_length_multiple, bool)
            or not isinstance(self.compact_length_multiple, int)
            or self.compact_length_multiple < 1
        ):
            _fail("compact_length_multiple", self.compact_length_multiple, "an int >= 1")
        self.routed_layers = self._normalise_routed_layers(self.routed_layers)
        for layer, coeff in self.load_loss_layer_coeffs.items():
            if not isinstance(layer, int) or layer < 0 or coeff < 0:
                _fail(
                    "load_loss_layer_coeffs",
                    self.load_loss_layer_coeffs,
                    "a dict {layer_index >= 0: multiplier >= 0}",
                )

    @staticmethod
    def _normalise_routed_layers(spec):
        allowed = "'all' | 'every_other' | a list or comma string of 0-based layer indices"
        if isinstance(spec, str):
            text = spec.strip()
            if text in ROUTED_LAYER_KEYWORDS:
                return text
            parts = [p.strip() for p in text.split(",") if p.strip()]
            try:
                spec = [int(p) for p in parts]
            except ValueError:
                _fail("routed_layers", text, allowed)
        if not isinstance(spec, (list, tuple)) or not spec:
            _fail("routed_layers", spec, allowed)
        indices = []
        for item in spec:
            if isinstance(item, bool) or not isinstance(item, int) or item < 0:
                _fail("routed_layers", spec, allowed)
            indices.append(int(item))
        if len(set(indices)) != len(indices):
            _fail("routed_layers", spec, allowed + " (without duplicates)")
        return sorted(indices)

    def routed_layer_indices(self, num_layers: int) -> list[int]:
        """The 0-based global indices of routed layers in a model of ``num_layers`` layers.

        Raises:
            ValueError: if an explicit index is outside the model.
        """
        if self.routed_layers == "all":
            return list(range(num_layers))
        if self.routed_layers == "every_other":
            return list(range(1, num_layers, 2))
        bad = [i for i in self.routed_layers if i >= num_layers]
        if bad:
            raise ValueError(
                f"MoDConfig.routed_layers names layers {bad} but the model has {num_layers} "
                f"layers (valid indices 0..{num_layers - 1})"
            )
        return list(self.routed_layers)

    def is_routed(self, layer_index: int, num_layers: int) -> bool:
        """Whether global 0-based layer ``layer_index`` is routed."""
        return layer_index in self.routed_layer_indices(num_layers)

    def layer_load_loss_coeff(self, layer_index: int) -> float:
        """alpha for one layer (the global alpha times an optional per-layer multiplier)."""
        return self.load_loss_coeff * self.load_loss_layer_coeffs.get(layer_index, 1.0)

    # ----------------------------------------------------------------- serialisation / CLI

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (used in checkpoints and exported HF configs)."""
        out = dataclasses.asdict(self)
        out["load_loss_layer_coeffs"] = {str(k): v for k, v in self.load_loss_layer_coeffs.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict) -> MoDConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming the key."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown MoDConfig keys {unknown}; known keys: {sorted(names)}")
        data = dict(data)
        if "load_loss_layer_coeffs" in data:
            data["load_loss_layer_coeffs"] = {
                int(k): float(v) for k, v in data["load_loss_layer_coeffs"].items()
            }
        return cls(**data)

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        """Add the ``--mod-*`` flags to an argparse parser."""
        g = parser.add_argument_group("Mixture-of-Depths")
        g.add_argument("--mod-routing", choices=ROUTING_CHOICES, default="threshold")
        g.add_argument("--mod-threshold", type=float, default=0.5, help="p in [0, 1]")
        g.add_argument("--mod-capacity", type=float, default=0.125, help="c in (0, 1], top-k")
        g.add_argument("--mod-gate", choices=GATE_CHOICES, default="scale")
        g.add_argument(
            "--mod-routed-layers",
            default="every_other",
            help="all | every_other | comma list of 0-based layer indices",
        )
        g.add_argument("--mod-load-loss-coeff", type=float, default=0.01, help="alpha >= 0")
        g.add_argument("--mod-router-init-bias", type=float, default=2.0)
        g.add_argument("--mod-router-init-std", type=float, default=0.02)
        g.add_argument(
            "--mod-topk-decode-threshold",
            type=float,
            default=None,
            help="top-k only: gate threshold for decoding one token at a time",
        )
        g.add_argument(
            "--mod-compact-length-multiple",
            type=int,
            default=64,
            help="round the kept-token length of each routed layer up to this (GEMM alignment)",
        )

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> MoDConfig:
        """Build a config from the flags added by :meth:`add_cli_args`."""
        return cls(
            routing=args.mod_routing,
            threshold=args.mod_threshold,
            capacity=args.mod_capacity,
            gate=args.mod_gate,
            routed_layers=args.mod_routed_layers,
            load_loss_coeff=args.mod_load_loss_coeff,
            router_init_bias=args.mod_router_init_bias,
            router_init_std=args.mod_router_init_std,
            topk_decode_threshold=getattr(args, "mod_topk_decode_threshold", None),
            compact_length_multiple=getattr(args, "mod_compact_length_multiple", 64),
        )
