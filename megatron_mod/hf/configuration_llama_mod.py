"""Configuration of the Hugging Face Mixture-of-Depths LLaMA model (``model_type: llama_mod``).

This file is copied next to exported checkpoints and loaded with ``trust_remote_code=True``, so
it imports only ``transformers`` (never ``megatron_mod``).
"""

from __future__ import annotations

import math

import transformers
from transformers import LlamaConfig

__all__ = ["LlamaModConfig"]

_TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
ROUTING_CHOICES = ("threshold", "topk")
GATE_CHOICES = ("scale", "straight_through")
ROUTER_INPUT_CHOICES = ("rms_normed", "hidden")


def _bad(key: str, value, allowed: str) -> ValueError:
    return ValueError(f"LlamaModConfig.{key}={value!r} is invalid; allowed: {allowed}")


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class LlamaModConfig(LlamaConfig):
    """A LLaMA config plus the Mixture-of-Depths routing settings.

    Routed layer ``i`` computes ``g = sigmoid(w_i . h + b_i)`` on its input ``h`` and sends a
    token through the decoder layer only if it is kept (threshold: ``g >= mod_threshold``; top-k:
    among the ``ceil(mod_capacity * S)`` largest logits of its sequence). Skipped tokens pass
    through unchanged and write no K/V in that layer.

    Args:
        mod_routing: ``"threshold"`` (causal, the default) or ``"topk"`` (the original MoD
            baseline; not causal, see ``mod_topk_decode_threshold``).
        mod_threshold: p in [0, 1] for threshold routing. Can be changed at load time
            (``from_pretrained(..., mod_threshold=0.3)``) or at run time
            (``model.set_mod_threshold(0.3)``): lower p computes more tokens.
        mod_capacity: c in (0, 1]; top-k keeps ``ceil(c * S)`` tokens of each sequence of ``S``
            real (non-padding) tokens, at least one.
        mod_gate: ``"scale"`` (``h + g * (layer(h) - h)``) or ``"straight_through"`` (forward
            value exactly ``layer(h)`` for kept tokens).
        mod_routed_layers: 0-based indices of routed layers; ``None`` or ``"every_other"`` means
            every odd layer (1, 3, 5, ...), ``"all"`` every layer. Other layers are dense.
        mod_topk_decode_threshold: for a top-k model, the gate threshold used when decoding with a
            cache (top-k ranks a whole sequence, which a token-by-token decode cannot see). The
            prompt (the first, cache-filling forward) still uses top-k. ``None`` makes cached
            decoding of a top-k model an error; decode with ``use_cache=False`` instead, which
            re-ranks the whole sequence at each step.
        mod_router_input: ``"rms_normed"`` (the router reads ``h / rms(h)``) or ``"hidden"``
            (raw ``h``; exports written before the option existed).
        mod_keep_first_token: threshold routing always keeps the token at position 0 (the
            attention sink) in every routed layer.
        mod_skipped_kv: in routed layers, skipped tokens still run the K/V projections and
            are stored in the cache, so kept tokens attend to every earlier token; queries,
            attention, the output projection and the MLP still run on kept tokens only.
        mod_layer_thresholds: per-layer thresholds ``{"layer": p}`` replacing ``mod_threshold``
            in those layers (set by training with a compute target); ``set_mod_threshold``
            clears them.
        attention_qkv_bias: q/k/v projections carry biases and o_proj none (Qwen2 / Qwen2.5
            converted to MoD); ``attention_bias`` (biases on all four) stays LLaMA's.
        **kwargs: ``LlamaConfig`` arguments (``rope_theta``/``rope_scaling`` or transformers 5's
            ``rope_parameters``).
    """

    model_type = "llama_mod"

    def __init__(
        self,
        mod_routing: str = "threshold",
        mod_threshold: float = 0.5,
        mod_capacity: float = 0.125,
        mod_gate: str = "scale",
        mod_routed_layers=None,
        mod_topk_decode_threshold: float | None = None,
        mod_router_input: str = "hidden",
        mod_keep_first_token: bool = False,
        mod_skipped_kv: bool = False,
        mod_layer_thresholds: dict | None = None,
        attention_qkv_bias: bool = False,
        **kwargs,
    ):
        if not _TRANSFORMERS_5 and kwargs.get("rope_parameters") and "rope_theta" not in kwargs:
            # A config.json written by transformers 5 (rope_parameters) read by transformers 4.
            params = dict(kwargs.pop("rope_parameters"))
            kwargs["rope_theta"] = params.pop("rope_theta", 10000.0)
            if params.get("rope_type", "default") != "default":
                kwargs["rope_scaling"] = params
        self.attention_qkv_bias = bool(attention_qkv_bias)
        self.mod_routing = mod_routing
        self.mod_threshold = mod_threshold
        self.mod_capacity = mod_capacity
        self.mod_gate = mod_gate
        self.mod_routed_layers = mod_routed_layers
        self.mod_topk_decode_threshold = mod_topk_decode_threshold
        self.mod_router_input = mod_router_input
        self.mod_keep_first_token = mod_keep_first_token
        self.mod_skipped_kv = mod_skipped_kv
        self.mod_layer_thresholds = dict(mod_layer_thresholds or {})
        super().__init__(**kwargs)
        self.validate_mod()

    def validate_mod(self) -> None:
        """Check the ``mod_*`` values and normalise ``mod_routed_layers`` to a sorted index list.

        Called at construction and again by the model, since ``from_pretrained`` keyword
        overrides are set on the config after construction.

        Raises:
            ValueError: naming the offending key and its allowed values.
        """
        if self.mod_routing not in ROUTING_CHOICES:
            raise _bad("mod_routing", self.mod_routing, " | ".join(ROUTING_CHOICES))
        if not _is_real(self.mod_threshold) or not 0.0 <= self.mod_threshold <= 1.0:
            raise _bad("mod_threshold", self.mod_threshold, "a float p with 0 <= p <= 1")
        if not _is_real(self.mod_capacity) or not 0.0 < self.mod_capacity <= 1.0:
            raise _bad("mod_capacity", self.mod_capacity, "a float c with 0 < c <= 1")
        if self.mod_gate not in GATE_CHOICES:
            raise _bad("mod_gate", self.mod_gate, " | ".join(GATE_CHOICES))
        decode = self.mod_topk_decode_threshold
        if decode is not None and (not _is_real(decode) or not 0.0 <= decode <= 1.0):
            raise _bad("mod_topk_decode_threshold", decode, "None or a float with 0 <= p <= 1")
        self.mod_routed_layers = self._routed_layer_list(self.mod_routed_layers)
        if self.mod_router_input not in ROUTER_INPUT_CHOICES:
            raise _bad("mod_router_input", self.mod_router_input, " | ".join(ROUTER_INPUT_CHOICES))
        if not isinstance(self.mod_keep_first_token, bool):
            raise _bad("mod_keep_first_token", self.mod_keep_first_token, "true | false")
        if not isinstance(self.mod_skipped_kv, bool):
            raise _bad("mod_skipped_kv", self.mod_skipped_kv, "true | false")
        thresholds = {}
        for key, value in (self.mod_layer_thresholds or {}).items():
            try:
                layer = int(key)
            except (TypeError, ValueError):
                layer = -1
            if layer not in self.mod_routed_layers or not _is_real(value) or not 0 <= value <= 1:
                raise _bad(
                    "mod_layer_thresholds",
                    self.mod_layer_thresholds,
                    "a dict {routed layer index: p with 0 <= p <= 1}",
                )
            thresholds[str(layer)] = float(value)
        self.mod_layer_thresholds = thresholds

    def layer_threshold(self, layer_idx: int) -> float:
        """The gate threshold of routed layer ``layer_idx`` (its own, else ``mod_threshold``)."""
        return self.mod_layer_thresholds.get(str(layer_idx), self.mod_threshold)

    def _routed_layer_list(self, spec) -> list[int]:
        num_layers = self.num_hidden_layers
        allowed = (
            f"'all', 'every_other', or a non-empty list of distinct layer indices in "
            f"0..{num_layers - 1}"
        )
        if spec is None or spec == "every_other":
            spec = list(range(1, num_layers, 2))
            if not spec:
                raise _bad("mod_routed_layers", "every_other", allowed + " (1-layer model)")
            return spec
        if spec == "all":
            return list(range(num_layers))
        if isinstance(spec, str):
            try:
                spec = [int(p) for p in spec.split(",") if p.strip()]
            except ValueError:
                raise _bad("mod_routed_layers", spec, allowed) from None
        if not isinstance(spec, (list, tuple)) or not spec:
            raise _bad("mod_routed_layers", spec, allowed)
        for item in spec:
            if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item < num_layers:
                raise _bad("mod_routed_layers", spec, allowed)
        if len(set(spec)) != len(spec):
            raise _bad("mod_routed_layers", spec, allowed)
        return sorted(int(i) for i in spec)
