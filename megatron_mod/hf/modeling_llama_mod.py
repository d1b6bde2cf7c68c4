"""Hugging Face Mixture-of-Depths LLaMA (``LlamaModForCausalLM``) with a MoD KV cache.

This file is copied next to exported checkpoints and loaded with ``trust_remote_code=True``, so
it imports only ``torch``, ``transformers`` and its sibling configuration file.

Routing equals the megatron-mod layer (``megatron_mod/layer.py``): for routed layer ``i`` with
input residual stream ``h`` (before the input norm), ``logit = w_i . h + b_i`` in fp32 and
``g = sigmoid(logit)``. Threshold routing keeps ``g >= p``; top-k keeps the ``ceil(c * S)``
largest logits of each sequence of ``S`` real tokens. The kept tokens of each sequence are gathered
in order into a compact, right-padded batch and run through the whole decoder layer (attention
causal among kept tokens only, RoPE at their original positions, then the MLP); the results are
gated (``scale``: ``h + g * (layer(h) - h)``; ``straight_through``: ``layer(h)``) and scattered
back. Skipped tokens keep ``h`` and write no K/V in that layer. Padding tokens (``attention_mask``
0) are never computed, attended to, cached or counted, in routed and dense layers alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    repeat_kv,
)

try:  # transformers >= 5: init functions that leave tensors loaded from a checkpoint alone
    from transformers import initialization as _init
except ImportError:  # transformers 4.x initialises only the missing tensors
    from torch.nn import init as _init

from .configuration_llama_mod import LlamaModConfig

# transformers >= 5.23 renamed the cache argument and output field ``past_key_values`` to
# ``cache`` (the old name still works, with a deprecation warning); generate() passes the cache
# back under the new name. The model accepts both names and returns the cache under the name
# of the installed version, so that generate() feeds it back on every step.
_CACHE_FIELD = (
    "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {})
    else "past_key_values"
)  # fmt: skip


def _cache_argument(past_key_values, kwargs: dict):
    """The cache passed under either name (``past_key_values`` or ``cache``)."""
    cache = kwargs.pop("cache", None)
    return past_key_values if past_key_values is not None else cache


__all__ = [
    "LlamaModCache",
    "LlamaModCausalLMOutput",
    "LlamaModDecoderLayer",
    "LlamaModForCausalLM",
    "LlamaModModel",
    "LlamaModModelOutput",
    "LlamaModPreTrainedModel",
    "LlamaModRouter",
]

_CACHE_CHUNK = 64  # most slots a cache layer keeps unused after it grows
# torch >= 2.5 computes grouped-query attention without materialising repeated K/V.
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)
_TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


# ----------------------------------------------------------------------------------- router


def _threshold_logit(p: float) -> float:
    """The logit where sigmoid reaches ``p`` (-inf for 0, +inf for 1)."""
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    return math.log(p) - math.log1p(-p)


class LlamaModRouter(nn.Module):
    """``Linear(hidden -> 1)`` kept in fp32: ``logit = w . x + b`` for every token.

    ``x`` is ``h / rms(h)`` (``rms_normed``, no learned scale) or ``h`` itself (``hidden``), as
    the Megatron router computes it. The parameters stay fp32 even when the rest of the model
    is cast (``model.to(bfloat16)``, ``from_pretrained(..., torch_dtype=torch.bfloat16)``):
    routing decisions must not depend on the serving dtype, and the Megatron router is fp32 too.

    Args:
        hidden_size: model width.
        router_input: ``"rms_normed"`` or ``"hidden"``.
        eps: the RMS normalisation's epsilon (the model's ``rms_norm_eps``).
    """

    def __init__(self, hidden_size: int, router_input: str = "hidden", eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, hidden_size, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(1, dtype=torch.float32))
        self.router_input = router_input
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Router logits.

        Args:
            hidden_states: [b, s, h] layer input (any dtype).

        Returns:
            [b, s] float32 logits.
        """
        x = hidden_states.float()
        if self.router_input == "rms_normed":
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return F.linear(x, self.weight.float(), self.bias.float()).squeeze(-1)

    def _apply(self, fn, recurse=True):
        # Device moves apply; dtype casts of these fp32 parameters are undone.
        def keep_fp32(tensor):
            out = fn(tensor)
            if tensor.dtype == torch.float32 and out.is_floating_point():
                out = out.float()
            return out

        return super()._apply(keep_fp32, recurse)


# ------------------------------------------------------------------------------------ cache


class LlamaModCache:
    """KV cache that stores, per layer and per sequence, only the tokens that layer computed.

    Each layer holds right-padded tensors ``keys``/``values`` ``[b, kv_heads, capacity, head_dim]``
    (post-RoPE), ``positions`` ``[b, capacity]`` (the original position id of each stored token)
    and ``lengths`` ``[b]`` (valid entries per sequence). A routed layer appends only its kept
    tokens; a skipped token adds nothing. Padding tokens are never stored. When a layer needs more
    room, ``capacity`` grows to what it needs plus 1/32 of that (16 to 64 slots), so at most 64
    slots per layer (plus, in a batch, the slots by which a sequence is shorter than the layer's
    longest) are allocated and unused: :meth:`allocated_bytes` against :meth:`stored_bytes`.

    It is created by ``LlamaModModel.forward`` when ``use_cache=True`` and returned as
    ``past_key_values``; ``generate()`` passes it back. It cannot be rolled back, so assisted
    generation and contrastive search are not supported; beam search works (``reorder_cache``).

    Args:
        num_layers: number of decoder layers.
    """

    is_compileable = False
    min_headroom = 16
    """Fewest free slots a layer gets when it grows."""
    max_headroom = _CACHE_CHUNK
    """Most free slots a layer gets when it grows (the "one small chunk" it may hold unused)."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.keys: list[Optional[torch.Tensor]] = [None] * num_layers
        self.values: list[Optional[torch.Tensor]] = [None] * num_layers
        self.positions: list[Optional[torch.Tensor]] = [None] * num_layers
        self.lengths: list[Optional[torch.Tensor]] = [None] * num_layers
        self.host_lengths: list[Optional[list[int]]] = [None] * num_layers
        """``lengths`` mirrored on the host: capacity and masks are planned without a sync."""
        self.computed: list[Optional[list[int]]] = [None] * num_layers
        """Per layer and sequence, tokens the layer computed (host ints). Equal to the stored
        counts, except in ``mod_skipped_kv`` layers, which also store the skipped tokens."""
        self.executed_calls = [0] * num_layers
        """Per layer, forward calls in which it computed a token for at least one sequence."""
        self.seen_tokens = 0
        """Input columns consumed so far, padding included (what ``generate`` counts)."""
        self.real_tokens: Optional[torch.Tensor] = None
        """[b] long: real (non-padding) tokens consumed per sequence: the next position id."""

    # -- queries

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Input columns consumed so far (padding included), as ``transformers`` caches count."""
        return self.seen_tokens

    def get_max_length(self) -> None:
        """No maximum: the cache grows."""
        return None

    def get_max_cache_shape(self) -> int:
        """No maximum: the cache grows (``-1`` as ``transformers``' dynamic caches report)."""
        return -1

    def __len__(self) -> int:
        return self.num_layers

    def kept_counts(self, layer_idx: int) -> torch.Tensor:
        """[b] number of tokens stored for layer ``layer_idx`` in each sequence."""
        lengths = self.lengths[layer_idx]
        if lengths is None:
            batch, device = 0, None
            if self.real_tokens is not None:
                batch, device = self.real_tokens.shape[0], self.real_tokens.device
            return torch.zeros(batch, dtype=torch.long, device=device)
        return lengths.clone()

    def stored_bytes(self) -> int:
        """Bytes of the entries in use: K, V and position of every stored token, all layers."""
        total = 0
        for keys, values, positions, lengths in zip(
            self.keys, self.values, self.positions, self.host_lengths
        ):
            if keys is None:
                continue
            per_token = keys.shape[1] * keys.shape[3]
            per_token *= keys.element_size() + values.element_size()
            total += sum(lengths) * (per_token + positions.element_size())
        return total

    def allocated_bytes(self) -> int:
        """Bytes the cache's tensors occupy (capacity, not use), all layers."""
        total = 0
        for store in (self.keys, self.values, self.positions, self.lengths):
            total += sum(t.numel() * t.element_size() for t in store if t is not None)
        if self.real_tokens is not None:
            total += self.real_tokens.numel() * self.real_tokens.element_size()
        return total

    def layer_positions(self, layer_idx: int, batch_index: int) -> torch.Tensor:
        """Original position ids of the tokens layer ``layer_idx`` stored for one sequence."""
        if self.lengths[layer_idx] is None:
            device = None if self.real_tokens is None else self.real_tokens.device
            return torch.zeros(0, dtype=torch.long, device=device)
        n = self.host_lengths[layer_idx][batch_index]
        return self.positions[layer_idx][batch_index, :n].clone()

    # -- updates

    def _begin(self, batch_size: int, device: torch.device) -> None:
        if self.real_tokens is None:
            self.real_tokens = torch.zeros(batch_size, dtype=torch.long, device=device)
        elif self.real_tokens.shape[0] != batch_size:
            raise ValueError(
                f"LlamaModCache holds {self.real_tokens.shape[0]} sequences but the input has "
                f"{batch_size}"
            )

    def _end(self, num_columns: int, real: torch.Tensor) -> None:
        self.seen_tokens += num_columns
        self.real_tokens = self.real_tokens + real.sum(dim=1)

    def _ensure_capacity(self, layer_idx: int, like: torch.Tensor, needed: int) -> None:
        batch, heads, _, head_dim = like.shape
        keys = self.keys[layer_idx]
        if keys is not None and keys.shape[2] >= needed:
            return
        old = 0 if keys is None else keys.shape[2]
        # Never grow by doubling: that can leave half of the cache empty, so that it allocates
        # more than a dense cache. Headroom of 1/32 of the length (16 to 64 slots) keeps the
        # unused part small at every length, while decoding copies the layer only once per 16 to
        # 64 appended tokens (a few % of a decode step's attention reads of the same cache).
        headroom = min(max(needed // 32, self.min_headroom), self.max_headroom)
        capacity = needed + headroom
        new_keys = like.new_zeros(batch, heads, capacity, head_dim)
        new_values = like.new_zeros(batch, heads, capacity, head_dim)
        new_positions = torch.zeros(batch, capacity, dtype=torch.long, device=like.device)
        if keys is None:
            self.lengths[layer_idx] = torch.zeros(batch, dtype=torch.long, device=like.device)
        else:
            new_keys[:, :, :old] = keys
            new_values[:, :, :old] = self.values[layer_idx]
            new_positions[:, :old] = self.positions[layer_idx]
        self.keys[layer_idx], self.values[layer_idx] = new_keys, new_values
        self.positions[layer_idx] = new_positions

    def update(
        self,
        layer_idx: int,
        key: torch.Tensor,
        value: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor,
        counts: list[int],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append a layer's newly computed tokens and return what they attend to.

        No host synchronisation: sizes come from ``counts`` and the host copy of the lengths.

        Args:
            layer_idx: the layer.
            key: [b, kv_heads, m, d] post-RoPE keys of the compact new tokens.
            value: [b, kv_heads, m, d].
            positions: [b, m] original position ids.
            valid: [b, m] bool, a prefix of each row: real compact tokens (the rest is padding).
            counts: the number of valid tokens of each row, on the host (``valid.sum(1)``).

        Returns:
            ``(keys, values, mask)``: ``[b, kv_heads, L, d]`` twice and a ``[b, 1, m, L]`` bool
            mask (True = attend) under which compact token ``i`` of sequence ``s`` sees the
            sequence's earlier stored tokens and the new tokens ``0..i``. ``mask`` is None when
            that is plain causal attention over the returned keys (empty cache, or one new token
            per sequence and equal stored lengths), so the caller can use the faster kernel.
        """
        m = key.shape[2]
        before = self.host_lengths[layer_idx] or [0] * key.shape[0]
        shortest, longest = min(before, default=0), max(before, default=0)
        lengths = self.lengths[layer_idx]
        keys, values, _, _ = self.append(layer_idx, key, value, positions, valid, counts)
        if longest == 0:
            return key, value, None
        if m == 1 and shortest == longest:
            return keys, values, None
        needed = keys.shape[2]
        arange_k = torch.arange(needed, device=key.device)
        arange_q = torch.arange(m, device=key.device)
        # Query i sees slots [0, len + i]: its sequence's cached tokens, then new tokens 0..i.
        limit = lengths[:, None] + arange_q[None, :] + 1
        mask = arange_k[None, None, :] < limit[:, :, None]
        return keys, values, mask[:, None]

    def append(
        self,
        layer_idx: int,
        key: torch.Tensor,
        value: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor,
        counts: list[int],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append a layer's new tokens; return everything it holds, for a mask built by position.

        No host synchronisation: sizes come from ``counts`` and the host copy of the lengths.

        Args: as :meth:`update`.

        Returns:
            ``(keys, values, positions, lengths)``: ``[b, kv_heads, L, d]`` twice, ``[b, L]``
            position ids and ``[b]`` valid entries per sequence; slots past a sequence's length
            hold finite leftovers that a mask must exclude.
        """
        batch, heads, m, head_dim = key.shape
        before = self.host_lengths[layer_idx] or [0] * batch
        # Room for every compact slot, padding included, so padded query rows index real memory.
        needed = max(before, default=0) + m
        self._ensure_capacity(layer_idx, key, needed)
        lengths = self.lengths[layer_idx]
        # Every compact slot is written, padding included: a padded slot lands past its
        # sequence's new length, where no real query reads and the next append overwrites. No
        # data-dependent index (nonzero), so no host synchronisation.
        slots = lengths[:, None] + torch.arange(m, device=key.device)[None, :]
        index = slots[:, None, :, None].expand(batch, heads, m, head_dim)
        self.keys[layer_idx].scatter_(2, index, key.to(self.keys[layer_idx].dtype))
        self.values[layer_idx].scatter_(2, index, value.to(self.values[layer_idx].dtype))
        self.positions[layer_idx].scatter_(1, slots, positions)
        self.lengths[layer_idx] = lengths + valid.sum(dim=1)
        self.host_lengths[layer_idx] = [b + c for b, c in zip(before, counts)]
        return (
            self.keys[layer_idx][:, :, :needed],
            self.values[layer_idx][:, :, :needed],
            self.positions[layer_idx][:, :needed],
            self.lengths[layer_idx],
        )

    def record_computed(self, layer_idx: int, counts: list[int]) -> None:
        """Count the tokens a layer computed in one call (host ints: no synchronisation)."""
        before = self.computed[layer_idx] or [0] * len(counts)
        self.computed[layer_idx] = [b + c for b, c in zip(before, counts)]
        self.executed_calls[layer_idx] += int(max(counts, default=0) > 0)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select/reorder sequences (beam search)."""
        order = beam_idx.tolist()
        for i in range(self.num_layers):
            for host in (self.host_lengths, self.computed):
                if host[i] is not None:
                    host[i] = [host[i][j] for j in order]
            for store in (self.keys, self.values, self.positions, self.lengths):
                if store[i] is not None:
                    store[i] = store[i].index_select(0, beam_idx.to(store[i].device))
        if self.real_tokens is not None:
            self.real_tokens = self.real_tokens.index_select(
                0, beam_idx.to(self.real_tokens.device)
            )

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every sequence ``repeats`` times (``num_return_sequences`` expansion)."""
        index = torch.arange(
            0 if self.real_tokens is None else self.real_tokens.shape[0]
        ).repeat_interleave(repeats)
        self.reorder_cache(index)


# ---------------------------------------------------------------------------------- outputs


@dataclass
class LlamaModModelOutput(BaseModelOutputWithPast):
    """``BaseModelOutputWithPast`` plus ``router_stats`` (see :class:`LlamaModCausalLMOutput`)."""

    router_stats: Optional[dict[int, dict[str, Any]]] = None


@dataclass
class LlamaModCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus ``router_stats``.

    ``router_stats`` (with ``output_router_stats=True``) maps each routed layer index to
    ``{"kept_fraction": float, "mean_gate": float, "kept_tokens": int, "tokens": int,
    "keep": [b, s] bool tensor}``, over the real (non-padding) tokens of this call.
    """

    router_stats: Optional[dict[int, dict[str, Any]]] = None


# ---------------------------------------------------------------------------------- layers


class LlamaModDecoderLayer(LlamaDecoderLayer):
    """A stock ``LlamaDecoderLayer`` (same parameters) that computes only selected tokens.

    Routed layers add ``router`` (``router.weight`` [1, hidden], ``router.bias`` [1], fp32).

    Args:
        config: the model config.
        layer_idx: 0-based layer index.
        routed: whether this layer has a router.
    """

    def __init__(self, config: LlamaModConfig, layer_idx: int, routed: bool):
        super().__init__(config, layer_idx)
        self.layer_idx = layer_idx
        self.routed = routed
        if getattr(config, "attention_qkv_bias", False) and not config.attention_bias:
            # Qwen2-style attention: biases on q/k/v only.
            attn = self.self_attn
            for name in ("q_proj", "k_proj", "v_proj"):
                old = getattr(attn, name)
                setattr(attn, name, nn.Linear(old.in_features, old.out_features, bias=True))
        if routed:
            self.router = LlamaModRouter(
                config.hidden_size, config.mod_router_input, config.rms_norm_eps
            )

    def forward(
        self,
        hidden_states: torch.Tensor,
        keep: torch.Tensor,
        gates: Optional[torch.Tensor],
        position_ids: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        gate_mode: str,
        cache: Optional[LlamaModCache] = None,
        store: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Run the layer on the ``keep`` tokens of each sequence and combine.

        Args:
            hidden_states: [b, s, h] layer input.
            keep: [b, s] bool: tokens to compute (kept and real).
            gates: [b, s] fp32 router gates (routed layers) or None (dense: output = layer(h)).
            position_ids: [b, s] original position ids.
            position_embeddings: ``(cos, sin)`` [b, s, head_dim] at ``position_ids``.
            gate_mode: ``scale`` or ``straight_through``.
            cache: MoD cache to read from and append to, or None.
            store: [b, s] bool, ``mod_skipped_kv`` layers only: the tokens whose K/V the layer
                writes (every real token, a superset of ``keep``); kept tokens attend to them.

        Returns:
            [b, s, h] new hidden states (unchanged where ``keep`` is False).
        """
        batch, seq, hidden = hidden_states.shape
        counts = keep.sum(dim=1)
        if store is not None:
            # One host read for the kept and the stored counts together.
            counts_host, store_host = torch.stack([counts, store.sum(dim=1)]).tolist()
            if cache is not None:
                cache.record_computed(self.layer_idx, counts_host)
            if counts_host != store_host:
                return self._forward_with_skipped_kv(
                    hidden_states, keep, gates, position_ids, position_embeddings, gate_mode,
                    cache, store, counts_host, store_host,
                )  # fmt: skip
            # Every stored token is also kept: the ordinary path computes exactly that.
        else:
            # The layer's one host read: each sequence's kept count gives the compact length,
            # whether nothing or everything is kept, and the cache's bookkeeping.
            counts_host = counts.tolist()
            if cache is not None:
                cache.record_computed(self.layer_idx, counts_host)
        m = max(counts_host, default=0)
        if m == 0:
            return hidden_states  # nothing kept anywhere: the layer is the identity
        if min(counts_host) == seq:
            index = None  # everything kept: no gather/scatter
            compact, pos = hidden_states, position_ids
            cos, sin = position_embeddings
            valid = keep
        else:
            # A stable sort of "skipped?" puts each sequence's kept tokens first, in order.
            order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
            index = order[:, :m]
            valid = torch.arange(m, device=keep.device)[None, :] < counts[:, None]
            compact = hidden_states.gather(1, index[..., None].expand(-1, -1, hidden))
            pos = position_ids.gather(1, index)
            cos, sin = (
                t.gather(1, index[..., None].expand(-1, -1, t.shape[-1]))
                for t in position_embeddings
            )
        output = self._compute(compact, (cos, sin), pos, valid, cache, counts_host)
        return self._combine(hidden_states, compact, output, gates, index, valid, gate_mode)

    @staticmethod
    def _combine(hidden_states, compact, output, gates, index, valid, gate_mode):
        """Gate the compact outputs and scatter them back (``index`` None: nothing moved)."""
        hidden = hidden_states.shape[-1]
        dtype = hidden_states.dtype
        if gates is None:
            mixed = output
        else:
            compact_gates = gates if index is None else gates.gather(1, index)
            delta = output - compact
            if gate_mode == "scale":
                mixed = compact + compact_gates.to(dtype)[..., None] * delta
            else:
                # straight_through: forward value exactly layer(h), since g - sg(g) is exactly 0;
                # the router receives d loss/d g = <d loss/d h', layer(h) - h>, the scale gate's
                # gradient, finite for every g (also a gate that underflowed to 0).
                unit = compact_gates - compact_gates.detach()
                mixed = output + delta * unit.to(dtype)[..., None]
        mixed = torch.where(valid[..., None], mixed, compact)
        if index is None:
            return mixed
        return hidden_states.scatter(1, index[..., None].expand(-1, -1, hidden), mixed)

    def _forward_with_skipped_kv(
        self,
        hidden_states: torch.Tensor,
        keep: torch.Tensor,
        gates: Optional[torch.Tensor],
        position_ids: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        gate_mode: str,
        cache: Optional[LlamaModCache],
        store: torch.Tensor,
        counts: list[int],
        store_counts: list[int],
    ) -> torch.Tensor:
        """``mod_skipped_kv``: K/V for every stored token, everything else for kept tokens only.

        Skipped tokens run the input norm and the K/V projections (with RoPE on K) and are
        written to the cache; kept tokens also run the query projection, attention over every
        stored token at or before their position, the output projection and the MLP.
        """
        attn = self.self_attn
        head_dim = attn.head_dim
        batch, _, hidden = hidden_states.shape
        compact_kv, kv_positions, kv_valid, _ = _compact(
            store, max(store_counts), hidden_states, position_ids, position_embeddings
        )
        kv_x, (kv_cos, kv_sin) = compact_kv
        n = kv_x.shape[1]
        normed = self.input_layernorm(kv_x)
        k = attn.k_proj(normed).view(batch, n, -1, head_dim).transpose(1, 2)
        v = attn.v_proj(normed).view(batch, n, -1, head_dim).transpose(1, 2)
        k = _rotate(k, kv_cos, kv_sin)
        if cache is not None:
            k, v, kv_positions, kv_lengths = cache.append(
                self.layer_idx, k, v, kv_positions, kv_valid, store_counts
            )
            kv_valid = torch.arange(k.shape[2], device=k.device)[None, :] < kv_lengths[:, None]
        m = max(counts)
        if m == 0:
            return hidden_states  # K/V written; no token computes the layer
        (x, (cos, sin)), q_positions, q_valid, index = _compact(
            keep, m, hidden_states, position_ids, position_embeddings
        )
        q = attn.q_proj(self.input_layernorm(x)).view(batch, m, -1, head_dim).transpose(1, 2)
        q = _rotate(q, cos, sin)
        # Query i sees every stored token at or before its position. A padded query slot sees
        # every slot, so that no row is fully masked (its output is discarded).
        mask = kv_valid[:, None, :] & (kv_positions[:, None, :] <= q_positions[:, :, None])
        mask = (mask | ~q_valid[:, :, None])[:, None]
        groups = attn.num_key_value_groups
        if groups > 1:
            k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=attn.attention_dropout if self.training else 0.0,
            scale=getattr(attn, "scaling", head_dim**-0.5),
        )
        h = x + attn.o_proj(out.transpose(1, 2).reshape(batch, m, -1))
        output = h + self.mlp(self.post_attention_layernorm(h))
        return self._combine(hidden_states, x, output, gates, index, q_valid, gate_mode)

    def _compute(
        self,
        x: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        positions: torch.Tensor,
        valid: torch.Tensor,
        cache: Optional[LlamaModCache],
        counts: list[int],
    ) -> torch.Tensor:
        """The stock LLaMA decoder layer on a compact, right-padded batch ``x`` [b, m, h]."""
        attn = self.self_attn
        batch, m, _ = x.shape
        head_dim = attn.head_dim
        residual = x
        normed = self.input_layernorm(x)
        q = attn.q_proj(normed).view(batch, m, -1, head_dim).transpose(1, 2)
        k = attn.k_proj(normed).view(batch, m, -1, head_dim).transpose(1, 2)
        v = attn.v_proj(normed).view(batch, m, -1, head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v, mask = cache.update(self.layer_idx, k, v, positions, valid, counts)
        else:
            mask = None
        # Without a mask the compact batch is plain causal: right padding puts every real compact
        # token before every padded slot, so no real query can see a padded key.
        groups = attn.num_key_value_groups
        extra = {}
        if groups > 1 and _SDPA_GQA and mask is None and head_dim <= 256:
            # Flash / memory-efficient kernels take grouped K/V directly, but only without a
            # mask: with enable_gqa and a mask SDPA falls back to its slow "math" kernel (full
            # fp32 scores). transformers' sdpa_attention makes the same choice.
            extra["enable_gqa"] = True
        elif groups > 1:
            k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        dropout = attn.attention_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=dropout,
            is_causal=mask is None and m > 1,
            scale=getattr(attn, "scaling", head_dim**-0.5),
            **extra,
        )
        out = attn.o_proj(out.transpose(1, 2).reshape(batch, m, -1))
        h = residual + out
        return h + self.mlp(self.post_attention_layernorm(h))


def _compact(select, length, hidden_states, position_ids, position_embeddings):
    """The ``select`` tokens of each sequence, in order, right-padded to ``length``.

    Returns:
        ``((x, (cos, sin)), positions, valid, index)``: [b, m, h], [b, m, d] twice, [b, m]
        position ids, [b, m] bool (real slots) and the [b, m] source index.
    """
    order = torch.sort((~select).to(torch.int8), dim=1, stable=True).indices
    index = order[:, :length]
    valid = torch.arange(length, device=select.device)[None, :] < select.sum(dim=1)[:, None]
    x = hidden_states.gather(1, index[..., None].expand(-1, -1, hidden_states.shape[-1]))
    cos, sin = (
        t.gather(1, index[..., None].expand(-1, -1, t.shape[-1])) for t in position_embeddings
    )
    return (x, (cos, sin)), position_ids.gather(1, index), valid, index


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on one of q/k ([b, heads, m, d]) with [b, m, d] tables, as transformers applies it."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)


# ----------------------------------------------------------------------------------- models


class LlamaModPreTrainedModel(PreTrainedModel):
    """Weights initialisation and loading glue for the MoD LLaMA models."""

    config_class = LlamaModConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["LlamaModDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    # Routers stay fp32 under every load dtype (the non-strict list covers older transformers,
    # the strict one bf16 in newer ones).
    _keep_in_fp32_modules = ["router"]
    _keep_in_fp32_modules_strict = ["router"]
    # Attention is computed by torch's scaled_dot_product_attention on compact batches.
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flash_attn_2 = False
    _supports_flex_attn = False
    # The MoD cache is created by the model, not by generate(), and cannot be rolled back.
    _is_stateful = True
    _supports_cache_class = False
    _supports_static_cache = False

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def _init_weights(self, module: nn.Module) -> None:
        # Only modules the checkpoint did not fill are initialised here. transformers 5 marks
        # loaded tensors and skips them only when they are written through its init functions
        # (``transformers.initialization``), so the router uses those; everything else, the
        # rotary ``inv_freq`` buffers included (created empty on the meta device by
        # transformers 5), is the stock initialisation of the installed version.
        if isinstance(module, LlamaModRouter):
            # Small weights and bias +2 (g ~ 0.88): a fresh router keeps every token at p = 0.5,
            # as megatron-mod's default router initialisation does.
            _init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            _init.constant_(module.bias, 2.0)
        else:
            super()._init_weights(module)


class LlamaModModel(LlamaModPreTrainedModel):
    """The MoD LLaMA decoder stack (``embed_tokens``, ``layers``, ``norm``).

    Args:
        config: a :class:`LlamaModConfig`.
    """

    def __init__(self, config: LlamaModConfig):
        config.validate_mod()
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        routed = set(config.mod_routed_layers)
        self.layers = nn.ModuleList(
            LlamaModDecoderLayer(config, i, i in routed) for i in range(config.num_hidden_layers)
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _route(
        self,
        layer: LlamaModDecoderLayer,
        hidden_states: torch.Tensor,
        real: torch.Tensor,
        positions: torch.Tensor,
        decoding: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep mask and gates of routed ``layer``, on the device of its router."""
        device = layer.router.weight.device
        logits = layer.router(hidden_states.to(device))
        return self._select(logits, real.to(device), positions.to(device), decoding, layer)

    def _select(
        self,
        logits: torch.Tensor,
        real: torch.Tensor,
        positions: torch.Tensor,
        decoding: bool,
        layer: LlamaModDecoderLayer,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep mask and gates of one routed layer (padding is never kept)."""
        config = self.config
        gates = torch.sigmoid(logits)
        if config.mod_routing == "threshold":
            # Logits against logit(p), as the Megatron router compares (gates saturate in fp32).
            keep = logits >= _threshold_logit(config.layer_threshold(layer.layer_idx))
            if config.mod_keep_first_token:
                keep = keep | (positions == 0)
            return keep & real, gates
        if decoding:
            threshold = config.mod_topk_decode_threshold
            if threshold is None:
                raise ValueError(
                    "LlamaModConfig.mod_topk_decode_threshold is None: a top-k model cannot "
                    "decode with a cache (top-k ranks whole sequences). Set it (e.g. "
                    "model.config.mod_topk_decode_threshold = 0.5) or generate with "
                    "use_cache=False."
                )
            return (logits >= _threshold_logit(threshold)) & real, gates
        # top-k: the ceil(c * S) largest logits among each sequence's S real tokens. Python
        # float arithmetic, exactly as the Megatron router computes k.
        lengths = real.sum(dim=1).tolist()
        ks = [min(s, max(1, math.ceil(config.mod_capacity * s))) if s else 0 for s in lengths]
        masked = logits.masked_fill(~real, float("-inf"))
        order = torch.argsort(masked, dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(
            1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
        )
        k = torch.tensor(ks, device=logits.device)
        return (rank < k[:, None]) & real, gates

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[LlamaModCache] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        output_router_stats: bool = False,
        return_dict: Optional[bool] = None,
        **kwargs,
    ):
        """Embed, route and run the layers.

        Args:
            input_ids: [b, s] new tokens (only those not yet in ``past_key_values``).
            attention_mask: [b, s] or [b, past + s] with 1 for real tokens and 0 for padding
                (left padding for generation); its last ``s`` columns describe the new tokens.
            position_ids: [b, s]; default: count of real tokens before each token in its
                sequence (``attention_mask.cumsum(-1) - 1``, continued from the cache), so left
                padding does not shift positions.
            past_key_values: a :class:`LlamaModCache` from an earlier call, or None.
            inputs_embeds: [b, s, h] instead of ``input_ids``.
            use_cache: create/extend and return a :class:`LlamaModCache`.
            output_hidden_states: also return the input of every layer and the final output.
            output_router_stats: return per routed layer kept fraction and mean gate.
            return_dict: return a tuple when False.
            **kwargs: ignored extras that ``generate()`` may pass (``cache_position``, ...).

        Returns:
            :class:`LlamaModModelOutput`.
        """
        config = self.config
        return_dict = config.return_dict if return_dict is None else return_dict
        past_key_values = _cache_argument(past_key_values, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, seq, _ = inputs_embeds.shape
        device = inputs_embeds.device
        use_cache = config.use_cache if use_cache is None else use_cache
        if past_key_values is not None and not isinstance(past_key_values, LlamaModCache):
            # A cache object from elsewhere (e.g. an empty DynamicCache): only an empty one can
            # be replaced, since its contents would not follow MoD routing.
            if past_key_values.get_seq_length() != 0:
                raise TypeError(
                    f"LlamaModForCausalLM needs a LlamaModCache, got a filled "
                    f"{type(past_key_values).__name__}"
                )
            past_key_values = None
        cache = past_key_values
        if cache is None and use_cache:
            cache = LlamaModCache(config.num_hidden_layers)
        decoding = cache is not None and cache.seen_tokens > 0
        if cache is not None:
            cache._begin(batch, device)

        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[1] < seq:
                raise ValueError(
                    f"attention_mask must be [batch, past + new] (2-D, at least {seq} columns), "
                    f"got shape {tuple(attention_mask.shape)}"
                )
            real = attention_mask[:, -seq:].to(device=device, dtype=torch.bool)
        else:
            real = torch.ones(batch, seq, dtype=torch.bool, device=device)
        if position_ids is None:
            start = cache.real_tokens[:, None] if cache is not None else 0
            position_ids = (start + real.long().cumsum(dim=1) - 1).clamp(min=0)
        position_ids = position_ids.to(device).expand(batch, -1)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        all_hidden = () if output_hidden_states else None
        stats = {} if output_router_stats else None
        num_real = real.sum()
        # Per-device copies of what every layer combines with its own tensors: with
        # device_map="auto" consecutive layers live on different GPUs, and the mask, positions
        # and rotary tables are made on the embedding's device. One copy per device, not per layer.
        shared = {device: (real, position_ids, position_embeddings)}
        for layer in self.layers:
            if output_hidden_states:
                all_hidden += (hidden_states,)
            layer_device = layer.input_layernorm.weight.device
            hidden_states = hidden_states.to(layer_device)
            if layer_device not in shared:
                shared[layer_device] = (
                    real.to(layer_device),
                    position_ids.to(layer_device),
                    tuple(t.to(layer_device) for t in position_embeddings),
                )
            layer_real, layer_positions, layer_embeddings = shared[layer_device]
            if layer.routed:
                keep, gates = self._route(
                    layer, hidden_states, layer_real, layer_positions, decoding
                )
                if stats is not None:
                    kept = keep.sum()
                    denom = max(int(num_real), 1)
                    stats[layer.layer_idx] = {
                        "kept_fraction": float(kept) / denom,
                        "mean_gate": float(gates.detach().masked_fill(~layer_real, 0).sum())
                        / denom,
                        "kept_tokens": int(kept),
                        "tokens": int(num_real),
                        "keep": keep.detach(),
                    }
            else:
                keep, gates = layer_real, None
            hidden_states = layer(
                hidden_states,
                keep=keep,
                gates=gates,
                position_ids=layer_positions,
                position_embeddings=layer_embeddings,
                gate_mode=config.mod_gate,
                cache=cache,
                store=layer_real if layer.routed and config.mod_skipped_kv else None,
            )
        hidden_states = self.norm(hidden_states.to(self.norm.weight.device))
        if output_hidden_states:
            all_hidden += (hidden_states,)
        if cache is not None:
            cache._end(seq, real)
        output = LlamaModModelOutput(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden,
            router_stats=stats,
            **{_CACHE_FIELD: cache if use_cache else None},
        )
        return output if return_dict else output.to_tuple()


class LlamaModForCausalLM(LlamaModPreTrainedModel, GenerationMixin):
    """Mixture-of-Depths LLaMA with a language-model head; works with ``generate()``.

    Parameter names equal ``transformers.LlamaForCausalLM``'s plus
    ``model.layers.{i}.router.{weight,bias}`` on routed layers.

    Args:
        config: a :class:`LlamaModConfig`.
    """

    # Tied only when ``config.tie_word_embeddings`` (SmolLM2, LLaMA-3.2 1B/3B): one matrix. The
    # form of this attribute changed in transformers 5 (target -> source mapping).
    _tied_weights_keys = (
        {"lm_head.weight": "model.embed_tokens.weight"} if _TRANSFORMERS_5 else ["lm_head.weight"]
    )

    def __init__(self, config: LlamaModConfig):
        super().__init__(config)
        self.model = LlamaModModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_decoder(self):
        return self.model

    def set_mod_threshold(self, threshold: float) -> None:
        """Change the routing threshold p at run time (lower p computes more tokens).

        The one threshold replaces per-layer ones (``mod_layer_thresholds``, which are
        cleared).

        Args:
            threshold: p in [0, 1]; used by threshold routing (not by top-k routing, whose
                decode threshold is ``config.mod_topk_decode_threshold``).

        Raises:
            ValueError: if ``threshold`` is outside [0, 1].
        """
        old = self.config.mod_threshold
        self.config.mod_threshold = threshold
        try:
            self.config.validate_mod()
        except ValueError:
            self.config.mod_threshold = old
            raise
        self.config.mod_layer_thresholds = {}
        self.model.config.mod_threshold = threshold
        self.model.config.mod_layer_thresholds = {}

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[LlamaModCache] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        output_router_stats: bool = False,
        return_dict: Optional[bool] = None,
        logits_to_keep: int = 0,
        **kwargs,
    ):
        """Logits (and loss with ``labels``) of the MoD model.

        Args:
            input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                output_hidden_states, output_router_stats: see :meth:`LlamaModModel.forward`.
            labels: [b, s] next-token targets (shifted inside; -100 ignored).
            return_dict: return a tuple when False.
            logits_to_keep: compute logits for the last this-many positions only (0: all).
            **kwargs: ignored extras passed by ``generate()``.

        Returns:
            :class:`LlamaModCausalLMOutput`.
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=_cache_argument(past_key_values, kwargs),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_router_stats=output_router_stats,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states.to(self.lm_head.weight.device))
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            shift_labels = labels[:, 1:].to(logits.device).reshape(-1)
            loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
        output = LlamaModCausalLMOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            router_stats=outputs.router_stats,
            **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)},
        )
        return output if return_dict else output.to_tuple()

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: Optional[LlamaModCache] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        use_cache: bool = True,
        **kwargs,
    ) -> dict[str, Any]:
        """Feed only the tokens the MoD cache has not seen; positions come from the mask."""
        past_key_values = _cache_argument(past_key_values, kwargs)
        if past_key_values is not None and not isinstance(past_key_values, LlamaModCache):
            if past_key_values.get_seq_length() == 0:
                past_key_values = None
        seen = past_key_values.seen_tokens if past_key_values is not None else 0
        inputs = {
            "past_key_values": past_key_values,
            "use_cache": use_cache,
            "attention_mask": attention_mask,
        }
        cache_position = kwargs.get("cache_position")
        if inputs_embeds is not None and seen == 0:
            inputs["inputs_embeds"] = inputs_embeds
        elif not use_cache or seen == 0:
            inputs["input_ids"] = input_ids
        elif cache_position is not None:
            # generate() says how many columns are new (input_ids may lack the prompt columns
            # when the prompt was given as inputs_embeds).
            inputs["input_ids"] = input_ids[:, -cache_position.shape[0] :]
        else:
            inputs["input_ids"] = input_ids[:, seen:]
        if not use_cache:
            inputs["past_key_values"] = None
        for key in ("position_ids", "output_router_stats", "logits_to_keep"):
            if kwargs.get(key) is not None:
                inputs[key] = kwargs[key]
        if "position_ids" in inputs and use_cache and seen:
            new = (inputs.get("input_ids") if "input_ids" in inputs else inputs_embeds).shape[1]
            inputs["position_ids"] = inputs["position_ids"][:, -new:]
        return inputs

    def _reorder_cache(self, past_key_values: LlamaModCache, beam_idx: torch.LongTensor):
        past_key_values.reorder_cache(beam_idx)
        return past_key_values


def _register_auto_classes() -> None:
    """Register ``llama_mod`` with the Auto classes when imported from the installed package.

    The copy inside a checkpoint (loaded as ``transformers_modules.*`` by ``trust_remote_code``)
    does not register: ``transformers`` maps that copy through the config's ``auto_map`` itself.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if (__package__ or "").startswith("transformers_modules"):
        return
    AutoConfig.register("llama_mod", LlamaModConfig, exist_ok=True)
    AutoModelForCausalLM.register(LlamaModConfig, LlamaModForCausalLM, exist_ok=True)


_register_auto_classes()
