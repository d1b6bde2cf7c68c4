"""The MoD transformer layer: a megatron-core TransformerLayer that only computes kept tokens.

It subclasses ``TransformerLayer`` so that its parameter names (and checkpoints) are those of the
dense layer plus ``router.weight`` / ``router.bias``: a dense checkpoint loads into a MoD model and
the HF mapping needs no special case. Forward (docs/design.md, "The routed layer"):

1. router logits on the local tokens (the SP shard under sequence parallelism), then gathered;
2. threshold-p or top-k selection on the full sequence (identical on every TP rank);
3. compact the kept tokens per sequence (original order, original RoPE positions), pad the
   compact length to a multiple of ``compact_length_multiple`` (and of TP under SP) and
   re-shard it under SP;
4. run attention + MLP on the compact batch only (causal among kept tokens);
5. gate, scatter back into the residual stream, re-shard; attach the load-reducing loss.

With ``MoDConfig.skipped_kv`` step 4 changes: the QKV projection runs on every token, so skipped
tokens still write K/V and each kept token attends to every earlier token (kept or skipped); the
queries, attention, output projection and MLP still run on the kept tokens only.
"""

from __future__ import annotations

import math

import torch
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rotary_pos_embedding import apply_rotary_pos_emb
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.utils import make_viewless_tensor

from megatron_mod.config import MoDConfig
from megatron_mod.dispatcher import MoDTokenDispatcher
from megatron_mod.metrics import get_metrics_tracker
from megatron_mod.router import (
    MoDRouter,
    attach_load_loss,
    load_reducing_loss,
    logit_quantiles,
    select_tokens,
)
from megatron_mod.sequence_parallel import SequenceParallelTokenExchange

__all__ = ["MoDTransformerLayer"]


class MoDTransformerLayer(TransformerLayer):
    """A routed transformer layer (attention and MLP skipped together for NoOp tokens).

    Args:
        config: transformer config of the model.
        submodules: the dense layer's submodules (from the local or TE spec).
        *args: TransformerLayer's other arguments (layer_number, hidden_dropout, ...).
        mod_config: routing settings; required.
        **kwargs: TransformerLayer's other keyword arguments (pg_collection, vp_stage, ...).
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: TransformerLayerSubmodules,
        *args,
        mod_config: MoDConfig | None = None,
        **kwargs,
    ):
        if mod_config is None:
            raise ValueError("MoDTransformerLayer needs a mod_config (MoDConfig)")
        _refuse_unsupported(config)
        # Remaining arguments (layer_number, hidden_dropout, pg_collection, vp_stage, and whatever
        # newer megatron-core versions add) go to TransformerLayer unchanged.
        super().__init__(config, submodules, *args, **kwargs)
        self.mod_config = mod_config
        self.global_layer_index = self.layer_number - 1
        self.router = MoDRouter(config, mod_config)
        multiple = mod_config.compact_length_multiple
        self._pg_collection = kwargs.get("pg_collection")
        if config.sequence_parallel:
            multiple = math.lcm(multiple, torch.distributed.get_world_size(self._tp_group()))
        self.dispatcher = MoDTokenDispatcher(pad_to_multiple=multiple)
        # Under sequence parallelism only the kept tokens move between TP ranks (all-to-all).
        self.sp_exchange = SequenceParallelTokenExchange(pad_to_multiple=multiple)
        # The last routing decision, for inspection by tests and evaluation tools.
        self.last_keep: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor, **kwargs):
        """Route, compute the kept tokens, combine.

        The layer always runs attention and MLP, on a compact batch of at least
        ``compact_length_multiple`` slots (all of them padding when no token is kept), so every
        parameter gets a gradient in every step whatever the routing: megatron-core's DDP
        (``--overlap-grad-reduce``) and data-parallel ranks that route differently rely on it.

        Args:
            hidden_states: [s, b, h] ([s/tp, b, h] under sequence parallelism).
            **kwargs: the arguments TransformerBlock passes to every layer. ``attention_mask``
                (megatron's boolean mask, e.g. document masks from ``reset_attention_mask``) is
                restricted to the kept tokens; inference contexts and packed sequences are not
                supported here (decode with the exported HF model's MoD cache).

        Returns:
            (hidden_states, context) like ``TransformerLayer.forward``.
        """
        if kwargs.get("inference_context") is not None or kwargs.get("inference_params"):
            raise NotImplementedError(
                "megatron-core inference contexts store K/V for every token; decode a MoD model "
                "with the exported HF model (tools/convert_megatron_to_hf.py), whose cache keeps "
                "only the kept tokens"
            )
        if kwargs.get("packed_seq_params") is not None:
            raise NotImplementedError(
                "packed (THD) input is not supported by MoD layers yet; use padded [s, b] batches"
            )
        sequence_parallel = self.config.sequence_parallel

        logits = self.router(hidden_states)
        if sequence_parallel:
            # Every rank then routes the full sequence identically ([s, b] floats, cheap); the
            # backward keeps each rank's slice, and the router's grads are summed over TP.
            # The layer's own TP group (pg_collection), the one token planning and dispatch use.
            logits = gather_from_sequence_parallel_region(
                logits, tensor_parallel_output_grad=False, group=self._tp_group()
            )

        decision = select_tokens(logits, self.mod_config, self.global_layer_index)
        self.last_keep = decision.keep
        coeff = self.mod_config.layer_load_loss_coeff(self.global_layer_index)
        load_loss, kept_fraction, mean_gate = load_reducing_loss(decision, coeff)
        if not _in_backward_recomputation():
            # Under activation recomputation the forward runs again inside backward; the
            # micro-batch is recorded once.
            # The logits' quantiles let the compute-target controller place next step's
            # threshold where it keeps the scheduled fraction (training.controller).
            tracker = get_metrics_tracker()
            quantiles = logit_quantiles(logits) if tracker.record_logit_quantiles else None
            tracker.record(
                self.global_layer_index, kept_fraction, mean_gate, load_loss, decision.kth_gate,
                quantiles,
            )  # fmt: skip

        if sequence_parallel:
            group = self._tp_group()
            plan = self.sp_exchange.plan(decision.keep, group)
            state = plan.state
            layer_input = self.sp_exchange.dispatch(hidden_states, plan, group)
        else:
            layer_input, state = self.dispatcher.dispatch(hidden_states, decision.keep)
        layer_kwargs = dict(kwargs)
        attention_mask = kwargs.get("attention_mask")
        layer_kwargs["attention_mask"] = (
            None
            if attention_mask is None
            else self.dispatcher.compact_attention_mask(attention_mask, state)
        )
        layer_kwargs["rotary_pos_emb"] = self.dispatcher.compact_rotary(
            kwargs.get("rotary_pos_emb"), state
        )
        for key in ("rotary_pos_cos", "rotary_pos_sin", "rotary_pos_cos_sin"):
            layer_kwargs.pop(key, None)
        if self.mod_config.skipped_kv:
            layer_output = self._forward_with_skipped_kv(
                hidden_states, layer_input, state, attention_mask, kwargs.get("rotary_pos_emb")
            )
            context = kwargs.get("context")
        else:
            layer_output, context = super().forward(hidden_states=layer_input, **layer_kwargs)
        if sequence_parallel:
            output = self.sp_exchange.combine(
                hidden_states, layer_output, decision.gates, plan, self.mod_config.gate, group
            )
        else:
            output = self.dispatcher.combine(
                hidden_states, layer_input, layer_output, decision.gates, state,
                self.mod_config.gate,
            )  # fmt: skip

        if self.training and coeff > 0 and torch.is_grad_enabled():
            output = attach_load_loss(output, load_loss)
        output = make_viewless_tensor(
            inp=output, requires_grad=output.requires_grad, keep_graph=True
        )
        return output, context

    def _forward_with_skipped_kv(
        self,
        hidden_states: torch.Tensor,
        layer_input: torch.Tensor,
        state,
        attention_mask: torch.Tensor | None,
        rotary_pos_emb,
    ) -> torch.Tensor:
        """Attention + MLP for the kept tokens, with keys and values from every token.

        megatron-core's ``SelfAttention`` takes its queries and keys from one tensor, so its
        pieces are called directly: ``linear_qkv`` (with TP, SP and Transformer Engine's fused
        norm as configured) on the full sequence, queries gathered at the kept tokens, RoPE at
        original positions, ``core_attention`` with an explicit [b, 1, s_c, s] mask, then the
        dense layer's own bias-dropout-add and MLP on the compact batch. The Q part of the fused
        QKV projection is also computed for skipped tokens and discarded (megatron's fused
        ``linear_qkv`` has no K/V-only slice); the HF export computes K/V alone for them.

        Args:
            hidden_states: [s, b, h] layer input ([s/tp, b, h] under SP).
            layer_input: the compact batch from dispatch ([s_c, b, h], SP-sharded under SP).
            state: the global compact layout (index, valid).
            attention_mask: megatron's boolean [b or 1, 1, s, s] mask (True = masked) or None.
            rotary_pos_emb: [s, 1, 1, d] RoPE frequencies (or a (q, k) pair), or None.

        Returns:
            The compact layer output, shaped like ``layer_input``.
        """
        attention = self.self_attention
        kv_input = self.input_layernorm(hidden_states)
        query, key, value = attention.get_query_key_value_tensors(kv_input)
        query = query.gather(0, state.index[:, :, None, None].expand(-1, -1, *query.shape[2:]))
        if rotary_pos_emb is not None:
            q_freqs, k_freqs = (
                rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
            )
            compact_freqs = self.dispatcher.compact_rotary(q_freqs, state)
            query = apply_rotary_pos_emb(query, compact_freqs, config=attention.config)
            key = apply_rotary_pos_emb(key, k_freqs, config=attention.config)
        mask = self.dispatcher.compact_query_mask(attention_mask, state, key.shape[0])
        core = attention.core_attention(
            query, key, value, mask, attn_mask_type=AttnMaskType.arbitrary
        )
        attention_output_with_bias = attention.linear_proj(core)
        with self.bias_dropout_add_exec_handler():
            hidden = self.self_attn_bda(self.training, self.config.bias_dropout_fusion)(
                attention_output_with_bias, layer_input, self.hidden_dropout
            )
        return self._forward_mlp(hidden)

    def _tp_group(self):
        """The tensor-parallel group: from the layer's pg_collection, else megatron's state."""
        group = getattr(self._pg_collection, "tp", None) if self._pg_collection else None
        return group if group is not None else parallel_state.get_tensor_model_parallel_group()


def _in_backward_recomputation() -> bool:
    """True while autograd runs a backward pass (activation recomputation re-runs forwards)."""
    return torch._C._current_graph_task_id() != -1


def _refuse_unsupported(config: TransformerConfig) -> None:
    """Fail early, with the reason, on megatron-core features a routed layer cannot honour."""
    problems = []
    if config.context_parallel_size > 1:
        problems.append("context_parallel_size > 1: routing compacts whole sequences; set it to 1")
    if config.apply_rope_fusion:
        problems.append(
            "apply_rope_fusion=True: kept tokens carry per-sequence RoPE positions, which the "
            "fused kernel cannot take; set it to False"
        )
    if getattr(config, "fp8", None) or getattr(config, "fp4", None):
        problems.append(
            "fp8/fp4 training: not verified with MoD's variable compact batches; train in bf16"
        )
    cuda_graphs = getattr(config, "cuda_graph_impl", "none") not in (None, "none")
    if cuda_graphs or getattr(config, "enable_cuda_graph", False):
        problems.append(
            "CUDA graphs (cuda_graph_impl / enable_cuda_graph): a routed layer's compact batch "
            "changes shape every step, which a captured graph cannot replay; disable them"
        )
    if getattr(config, "tp_comm_overlap", False):
        problems.append(
            "tp_comm_overlap (Transformer Engine userbuffers) needs fixed sequence shapes; the "
            "compact batch varies, so disable --tp-comm-overlap"
        )
    if getattr(config, "mtp_num_layers", None):
        problems.append(
            "multi-token prediction (mtp_num_layers): MTP layers are not routed and not tested "
            "with MoD; set mtp_num_layers=None"
        )
    if problems:
        raise ValueError("MoD layers do not support: " + "; ".join(problems))
