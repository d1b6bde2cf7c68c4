"""Mixture-of-Depths configuration shared by the model, trainer, converters and CLIs."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass, field

ROUTING_CHOICES = ("threshold", "topk")
GATE_CHOICES = ("scale", "straight_through")
ROUTER_INPUT_CHOICES = ("rms_normed", "hidden")
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

    router_init_std: float = 0.0
    """Init std of the logit per unit RMS of h: w ~ N(0, std^2 / hidden); 0 (default): w = 0."""

    load_loss_layer_coeffs: dict[int, float] = field(default_factory=dict)
    """Optional per-layer multipliers of alpha, keyed by global 0-based layer index."""

    topk_decode_threshold: float | None = None
    """Top-k only: gate threshold for token-by-token decoding (set by training; None: unknown)."""

    compact_length_multiple: int = 64
    """Round each routed layer's compact (kept-token) length up to this; keeps GEMMs aligned."""

    router_input: str = "rms_normed"
    """`rms_normed`: the router reads h / rms(h) (well conditioned across layers); `hidden`: h."""

    keep_first_token: bool = True
    """Threshold routing never skips a sequence's first token (position 0, the attention sink)."""

    skipped_kv: bool = False
    """Skipped tokens still run the K/V projections and write K/V, so kept tokens attend to them."""

    layer_thresholds: dict[int, float] = field(default_factory=dict)
    """Per-layer gate thresholds p_j over `threshold` (set by the compute-target controller)."""

    layer_kept_targets: dict[int, float] = field(default_factory=dict)
    """Per-layer kept fractions a calibration chose (relative budgets for the compute target)."""

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
        if self.router_input not in ROUTER_INPUT_CHOICES:
            _fail("router_input", self.router_input, " | ".join(ROUTER_INPUT_CHOICES))
        if not isinstance(self.keep_first_token, bool):
            _fail("keep_first_token", self.keep_first_token, "True | False")
        if not isinstance(self.skipped_kv, bool):
            _fail("skipped_kv", self.skipped_kv, "True | False")
        for name in ("layer_thresholds", "layer_kept_targets"):
            for layer, value in getattr(self, name).items():
                if (
                    isinstance(layer, bool)
                    or not isinstance(layer, int)
                    or layer < 0
                    or not 0.0 <= value <= 1.0
                ):
                    _fail(name, getattr(self, name), "a dict {layer_index >= 0: value in [0, 1]}")
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

    def layer_threshold(self, layer_index: int) -> float:
        """Gate threshold p of one routed layer (its own, else the global ``threshold``)."""
        return self.layer_thresholds.get(layer_index, self.threshold)

    def layer_load_loss_coeff(self, layer_index: int) -> float:
        """alpha for one layer (the global alpha times an optional per-layer multiplier)."""
        return self.load_loss_coeff * self.load_loss_layer_coeffs.get(layer_index, 1.0)

    # ----------------------------------------------------------------- serialisation / CLI

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (used in checkpoints and exported HF configs)."""
        out = dataclasses.asdict(self)
        for name in _LAYER_DICTS:
            out[name] = {str(k): v for k, v in getattr(self, name).items()}
        return out

    @classmethod
    def from_dict(cls, data: dict) -> MoDConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming the key."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown MoDConfig keys {unknown}; known keys: {sorted(names)}")
        data = dict(data)
        for name in _LAYER_DICTS:
            if name in data:
                data[name] = {int(k): float(v) for k, v in data[name].items()}
        # Configs written before these fields existed routed on the raw hidden state and could
        # skip the first token; they keep doing so.
        for name, legacy in _LEGACY_DEFAULTS.items():
            data.setdefault(name, legacy)
        return cls(**data)

    @classmethod
    def add_cli_args(
        cls,
        parser: argparse.ArgumentParser,
        fields: Iterable[str] | None = None,
        with_defaults: bool = True,
        title: str = "Mixture-of-Depths",
    ) -> None:
        """Add one ``--mod-<field>`` flag per field to an argparse parser.

        Flags, types, choices and help texts come from the fields and their docstrings, so a
        new field gets its flag with no further code.

        Args:
            parser: the parser to extend.
            fields: which fields (default: every field that has a flag).
            with_defaults: ``False`` gives every flag the default ``None`` ("not given"), for
                tools that override a stored config only where a flag is passed.
            title: the argument group's title.
        """
        group = parser.add_argument_group(title)
        docs = _field_docstrings(cls)
        names = list(fields) if fields is not None else cli_field_names(cls)
        defaults = cls()
        for name in names:
            if name not in cli_field_names(cls):
                raise ValueError(f"MoDConfig has no command-line field {name!r}")
            default = getattr(defaults, name)
            kwargs = {"help": docs.get(name, "")}
            if name in _FIELD_CHOICES:
                kwargs["choices"] = _FIELD_CHOICES[name]
            else:
                kwargs["type"] = _CLI_TYPES.get(name, type(default))
            if with_defaults:
                kwargs["help"] += f" (default: {default})"
            group.add_argument(
                f"--mod-{name.replace('_', '-')}",
                dest=f"mod_{name}",
                default=default if with_defaults else None,
                **kwargs,
            )

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace, base: MoDConfig | None = None) -> MoDConfig:
        """A config from the ``--mod-*`` flags: ``base`` (default: the defaults) with every
        flag that holds a value (not ``None``) applied."""
        values = (base or cls()).to_dict()
        for name in cli_field_names(cls):
            value = getattr(args, f"mod_{name}", None)
            if value is not None:
                values[name] = value
        if getattr(args, "mod_threshold", None) is not None:
            values["layer_thresholds"] = {}  # one threshold given: it applies to every layer
        return cls.from_dict(values)


def _parse_bool(text: str) -> bool:
    """``true``/``false`` (also 1/0, yes/no) for boolean ``--mod-*`` flags."""
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


# The fields that have no command-line flag (structured values set in code or by training).
_LAYER_DICTS = ("load_loss_layer_coeffs", "layer_thresholds", "layer_kept_targets")
_NOT_ON_CLI = _LAYER_DICTS
# What a stored config that lacks a field meant when it was written.
_LEGACY_DEFAULTS = {"router_input": "hidden", "keep_first_token": False}
_FIELD_CHOICES = {
    "routing": ROUTING_CHOICES,
    "gate": GATE_CHOICES,
    "router_input": ROUTER_INPUT_CHOICES,
}
# Types argparse cannot read off the default value (None, or a str/list union).
_CLI_TYPES = {
    "topk_decode_threshold": float,
    "routed_layers": str,
    "keep_first_token": _parse_bool,
    "skipped_kv": _parse_bool,
}


def cli_field_names(cls=None) -> list[str]:
    """Fields of ``MoDConfig`` (or a subclass) that have a ``--mod-*`` flag, in order."""
    return [f.name for f in dataclasses.fields(cls or MoDConfig) if f.name not in _NOT_ON_CLI]


@functools.cache
def _field_docstrings(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass (the attribute-docstring convention)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split()).replace("%", "%%")
    return docs
