"""``LlamaModForCausalLM`` for vLLM: the ``llama_mod`` export served with real skipping.

vLLM's own LLaMA layers (``QKVParallelLinear``, ``RowParallelLinear``, its RMSNorm, RoPE and
``Attention``, so TP and the weight loader are vLLM's) with a router on each routed layer. On
vLLM's flattened token batch a routed layer

1. computes its router logits on the layer input (``megatron_mod.hf.modeling_llama_mod``'s
   router: the same fp32 math as the HF export and the Megatron router) and keeps a token iff
   its logit reaches ``logit(p)`` (the first position always, with ``mod_keep_first_token``);
2. gathers the kept tokens, runs attention (over the request's kept tokens, through
   :mod:`~megatron_mod.serving.vllm_kv`) and the MLP on them only;
3. gates them (``h + g * (layer(h) - h)`` or straight-through) and scatters them back.

Decoding is causal by construction (threshold routing ranks nothing), so every step of a request
routes its new tokens from their own hidden states; top-k exports route with their recorded
``mod_topk_decode_threshold`` for every token, prompt included.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.models.llama import LlamaDecoderLayer
from vllm.model_executor.models.llama import LlamaForCausalLM as VllmLlamaForCausalLM
from vllm.model_executor.models.llama import LlamaModel as VllmLlamaModel
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    PPMissingLayer,
    extract_layer_index,
    make_empty_intermediate_tensors_factory,
    make_layers,
)
from vllm.sequence import IntermediateTensors

from megatron_mod.hf.modeling_llama_mod import LlamaModRouter
from megatron_mod.serving.vllm_kv import RoutedAttentionPlanner

__all__ = [
    "LlamaModForCausalLM", "LlamaModDecoderLayer", "decode_threshold", "kept_token_counts"
]  # fmt: skip


def decode_threshold(config, layer_idx: int) -> float:
    """The gate threshold a served layer routes with (top-k exports: their decode threshold)."""
    if config.mod_routing == "topk":
        if config.mod_topk_decode_threshold is None:
            raise ValueError(
                "this top-k llama_mod export has no mod_topk_decode_threshold: top-k ranks "
                "whole sequences, which a server decoding token by token cannot do. Set "
                "mod_topk_decode_threshold in its config.json (training records it)"
            )
        return float(config.mod_topk_decode_threshold)
    return float(config.layer_threshold(layer_idx))


def _logit(p: float) -> float:
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    return math.log(p) - math.log1p(-p)


class LlamaModDecoderLayer(LlamaDecoderLayer):
    """vLLM's LLaMA decoder layer, routed when the config says so.

    Args:
        vllm_config: the engine config.
        prefix: the layer's module prefix (``model.layers.N``).
    """

    def __init__(self, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = vllm_config.model_config.hf_config
        self.layer_idx = extract_layer_index(prefix)
        self.routed = self.layer_idx in config.mod_routed_layers
        if not self.routed:
            return
        self.router = LlamaModRouter(
            config.hidden_size, config.mod_router_input, config.rms_norm_eps
        )
        self.threshold_logit = _logit(decode_threshold(config, self.layer_idx))
        self.keep_first_token = bool(config.mod_keep_first_token)
        self.gate_mode = config.mod_gate
        self.skipped_kv = bool(getattr(config, "mod_skipped_kv", False))
        self.planner = RoutedAttentionPlanner(
            self.self_attn.attn, vllm_config, skipped_kv=self.skipped_kv
        )

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.routed:
            return super().forward(positions, hidden_states, residual)
        stream = hidden_states if residual is None else hidden_states + residual
        logits = self.router(stream)
        keep = logits >= self.threshold_logit
        if self.keep_first_token:
            keep = keep | (positions == 0)
        plan = self.planner.plan(keep, positions)
        if plan is not None and plan.write_only:  # skipped_kv: K/V of the step, no compute
            attn = self.self_attn
            qkv, _ = attn.qkv_proj(self.input_layernorm(stream))
            q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
            _, k = attn.rotary_emb(positions, q, k)
            self.planner.write_kv(k, v)
            plan = None
        if plan is None:  # no token of the step computes this layer
            return stream, torch.zeros_like(stream)
        x = stream[plan.index]
        computed = self._compute(x, positions[plan.index], plan, stream, positions)
        if self.gate_mode == "scale":
            gates = torch.sigmoid(logits[plan.index]).to(x.dtype)[:, None]
            computed = x + gates * (computed - x)
        # straight_through: the forward value is the layer's output exactly.
        return stream.index_copy(0, plan.index, computed), torch.zeros_like(stream)

    def _compute(self, x, positions, plan, stream, all_positions) -> torch.Tensor:
        """The dense layer on the compact tokens ``x`` (attention through the plan)."""
        attn = self.self_attn
        if self.skipped_kv and plan.metadata is not None:
            # K/V for every token of the step (written at their own slots), queries for kept.
            qkv, _ = attn.qkv_proj(self.input_layernorm(stream))
            q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
            q, k = attn.rotary_emb(all_positions, q, k)
            out = self.planner.attend(
                plan, q[plan.index], k[plan.index], v[plan.index], all_keys=k, all_values=v
            )
        else:
            qkv, _ = attn.qkv_proj(self.input_layernorm(x))
            q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
            q, k = attn.rotary_emb(positions, q, k)
            out = self.planner.attend(plan, q, k, v)
        attn_out, _ = attn.o_proj(out)
        # The fused add works in place: give it a copy of the layer input.
        hidden, residual = self.post_attention_layernorm(attn_out, x.clone())
        return self.mlp(hidden) + residual


class LlamaModModel(nn.Module):
    """Embedding, decoder layers and final norm; eager (routing changes shapes every step)."""

    hf_to_vllm_mapper = VllmLlamaModel.hf_to_vllm_mapper

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", **_):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.vocab_size = config.vocab_size
        pp = get_pp_group()
        if pp.is_first_rank or (config.tie_word_embeddings and pp.is_last_rank):
            self.embed_tokens = VocabParallelEmbedding(
                self.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config
            )
        else:
            self.embed_tokens = PPMissingLayer()
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: LlamaModDecoderLayer(vllm_config=vllm_config, prefix=prefix),
            prefix=f"{prefix}.layers",
        )
        self.norm = (
            RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            if pp.is_last_rank
            else PPMissingLayer()
        )
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        if get_pp_group().is_first_rank:
            hidden = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
            residual = None
        else:
            hidden = intermediate_tensors["hidden_states"]
            residual = intermediate_tensors["residual"]
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden, residual = layer(positions, hidden, residual)
        if not get_pp_group().is_last_rank:
            if residual is None:
                residual = torch.zeros_like(hidden)
            return IntermediateTensors({"hidden_states": hidden, "residual": residual})
        if residual is None:
            return self.norm(hidden)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)


class LlamaModForCausalLM(VllmLlamaForCausalLM):
    """vLLM's ``LlamaForCausalLM`` (LM head, logits, weight loading) over :class:`LlamaModModel`.

    The checkpoint layout is the ``llama_mod`` export's (stock LLaMA names plus
    ``model.layers.N.router.{weight,bias}``).
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        config = vllm_config.model_config.hf_config
        config.validate_mod()
        super().__init__(vllm_config=vllm_config, prefix=prefix)

    def _init_model(self, vllm_config: VllmConfig, prefix: str = "", layer_type=None):
        return LlamaModModel(vllm_config=vllm_config, prefix=prefix)

    def routed_layers(self) -> list[LlamaModDecoderLayer]:
        """This rank's routed layers (each ``planner.last_kept_per_request`` after a step)."""
        return [m for m in self.model.layers if getattr(m, "routed", False)]


def kept_token_counts(model) -> dict[int, tuple[int, int]]:
    """``{layer: (tokens computed, tokens seen)}`` of a served model's routed layers since start.

    For ``LLM.apply_model(kept_token_counts)``: what the engine's routed layers computed, to
    compare with the HF model's router statistics or to report c_eff.
    """
    return {
        layer.layer_idx: (layer.planner.kept_tokens, layer.planner.seen_tokens)
        for layer in model.routed_layers()
    }
