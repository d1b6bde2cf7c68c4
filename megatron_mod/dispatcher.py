"""MoD token dispatcher: compact the kept tokens of each sequence, and scatter results back.

The routing map of a MoD layer has two "experts": compute and NoOp. Only the compute side does
work, so dispatch is a per-sequence gather of the kept tokens (in their original order) into a
right-padded compact batch ``[s_c, b, h]`` with ``s_c = max kept count``; combine applies the gate
and scatters the kept tokens back into the residual stream. megatron-core's MoE
``permute``/``unpermute`` produce a flat packed (THD) layout instead; the local attention backend
needs a padded [s, b] layout, and right padding lets the ordinary causal mask do the key-padding
work: every real compact token precedes every padded slot, so no real token can attend to one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DispatchState", "MoDTokenDispatcher"]


@dataclass
class DispatchState:
    """What combine needs to undo dispatch."""

    index: torch.Tensor
    """[s_c, b] long: original sequence position of each compact slot."""
    valid: torch.Tensor
    """[s_c, b] bool: True for real kept tokens, False for right padding."""
    kept_per_sequence: torch.Tensor
    """[b] long: number of kept tokens in each sequence."""


class MoDTokenDispatcher:
    """Gather/scatter between the full sequence and the compact kept-token batch.

    The compact length is the longest kept count in the micro-batch rounded up to
    ``pad_to_multiple`` (capped at the sequence length). Reading that count is the one host
    synchronisation of a routed layer: the compact batch's shape depends on it. A micro-batch
    that keeps no token still gets a compact batch of ``pad_to_multiple`` padded slots, so the
    layer runs (and every parameter receives a gradient, zero) whatever the routing decided:
    megatron-core's DDP expects a gradient for every parameter of every rank in every step.

    Args:
        pad_to_multiple: the compact length is rounded up to a multiple of this: the MoD config's
            ``compact_length_multiple`` (GEMM alignment, fp8 tiles), combined with the TP size
            under sequence parallelism so the compact batch splits evenly across TP ranks.
    """

    def __init__(self, pad_to_multiple: int = 1):
        self.pad_to_multiple = max(1, pad_to_multiple)

    def compact_length(self, kept_per_sequence: torch.Tensor, seq_len: int) -> int:
        """The padded compact length for these kept counts (one host synchronisation)."""
        longest = max(1, int(kept_per_sequence.max()))
        padded = -(-longest // self.pad_to_multiple) * self.pad_to_multiple
        return min(padded, seq_len)

    def dispatch(
        self, hidden_states: torch.Tensor, keep: torch.Tensor
    ) -> tuple[torch.Tensor, DispatchState]:
        """Gather kept tokens into a compact, right-padded batch.

        Args:
            hidden_states: [s, b, h] full-sequence hidden states.
            keep: [s, b] bool keep mask (may be all False).

        Returns:
            compact: [s_c, b, h]; padded slots hold (ignored) copies of skipped tokens.
            state: indices and validity mask for :meth:`combine`.
        """
        seq_len = keep.shape[0]
        kept_per_sequence = keep.sum(dim=0)
        compact_len = self.compact_length(kept_per_sequence, seq_len)
        # A stable sort of "skipped?" puts each sequence's kept tokens first, in original order.
        order = torch.sort((~keep).to(torch.int8), dim=0, stable=True).indices
        index = order[:compact_len]
        valid = torch.arange(compact_len, device=keep.device)[:, None] < kept_per_sequence[None, :]
        compact = hidden_states.gather(0, self._expand(index, hidden_states))
        return compact, DispatchState(index, valid, kept_per_sequence)

    def compact_attention_mask(
        self, attention_mask: torch.Tensor, state: DispatchState
    ) -> torch.Tensor:
        """megatron's boolean attention mask (True = masked) restricted to the compact batch.

        Entry ``[b, 0, i, j]`` is the original mask between the tokens in compact slots ``i`` and
        ``j`` of sequence ``b``; causality among compact slots is added, so a real token never
        sees a padded slot (padded slots come after every real token of their sequence).

        Args:
            attention_mask: [b or 1, 1, s, s] bool (e.g. document masks from
                ``reset_attention_mask``).
            state: from :meth:`dispatch`.

        Returns:
            [b, 1, s_c, s_c] bool.
        """
        if attention_mask.dtype != torch.bool:
            raise ValueError(
                f"MoD layers expect megatron's boolean attention mask (True = masked), got "
                f"dtype {attention_mask.dtype}"
            )
        compact_len, batch = state.index.shape
        index = state.index.t()  # [b, s_c]
        mask = attention_mask[:, 0].expand(batch, -1, -1)
        rows = mask.gather(1, index[:, :, None].expand(-1, -1, mask.shape[-1]))
        compact = rows.gather(2, index[:, None, :].expand(-1, compact_len, -1))
        causal = torch.ones(compact_len, compact_len, dtype=torch.bool, device=compact.device).triu(
            1
        )
        return (compact | causal)[:, None]

    def compact_query_mask(
        self, attention_mask: torch.Tensor | None, state: DispatchState, seq_len: int
    ) -> torch.Tensor:
        """Mask of compact queries against every token's key (``skipped_kv`` layers).

        Compact slot ``i`` of sequence ``b`` (original position ``index[i, b]``) may see the
        keys at positions ``<= index[i, b]``, restricted by ``attention_mask`` when given.
        Padded slots sit at a real (skipped) position, so no row is fully masked.

        Args:
            attention_mask: [b or 1, 1, s, s] bool (True = masked) or None.
            state: from :meth:`dispatch`.
            seq_len: the number of keys ``s``.

        Returns:
            [b, 1, s_c, s] bool, True = masked.
        """
        query_pos = state.index.t()[:, :, None]  # [b, s_c, 1]
        key_pos = torch.arange(seq_len, device=query_pos.device)[None, None, :]
        mask = key_pos > query_pos
        if attention_mask is not None:
            if attention_mask.dtype != torch.bool:
                raise ValueError(
                    f"MoD layers expect megatron's boolean attention mask (True = masked), got "
                    f"dtype {attention_mask.dtype}"
                )
            rows = attention_mask[:, 0].expand(query_pos.shape[0], -1, -1)
            mask = mask | rows.gather(1, query_pos.expand(-1, -1, seq_len))
        return mask[:, None]

    def compact_rotary(self, rotary_pos_emb, state: DispatchState):
        """RoPE frequencies at each compact token's ORIGINAL position: [s_c, b, 1, d].

        Args:
            rotary_pos_emb: [s, 1, 1, d] tensor (or a (q, k) tuple of them) for positions 0..s-1.
        """
        if rotary_pos_emb is None:
            return None
        if isinstance(rotary_pos_emb, tuple):
            return tuple(self.compact_rotary(r, state) for r in rotary_pos_emb)
        return rotary_pos_emb[:, 0, 0, :][state.index].unsqueeze(2)

    def combine(
        self,
        hidden_states: torch.Tensor,
        compact_input: torch.Tensor,
        compact_output: torch.Tensor,
        gates: torch.Tensor,
        state: DispatchState,
        gate_mode: str,
    ) -> torch.Tensor:
        """Apply the gate to the kept tokens and scatter them back into place.

        ``scale``: h' = h + g * (layer(h) - h). ``straight_through``: h' = layer(h) + delta *
        (g - stopgrad(g)): the forward value is exactly layer(h) (the added term is an exact
        zero), and the router receives dL/dg = <dL/dh', layer(h) - h>, the gradient the ``scale``
        gate would give at that token. The form is finite for every gate, including gates that
        underflow to 0 and the gates of padded slots. Skipped tokens (and padded slots) keep h.

        Args:
            hidden_states: [s, b, h] layer input (full sequence).
            compact_input: [s_c, b, h] what :meth:`dispatch` returned.
            compact_output: [s_c, b, h] the layer's output on the compact batch.
            gates: [s, b] fp32 router gates.
            state: from :meth:`dispatch`.
            gate_mode: ``scale`` or ``straight_through``.

        Returns:
            [s, b, h] new hidden states.
        """
        compact_gates = gates.gather(0, state.index)
        mixed = self.mix(compact_input, compact_output, compact_gates, gate_mode)
        mixed = torch.where(state.valid[..., None], mixed, compact_input)
        return hidden_states.scatter(0, self._expand(state.index, hidden_states), mixed)

    @staticmethod
    def mix(
        layer_input: torch.Tensor, layer_output: torch.Tensor, gates: torch.Tensor, gate_mode: str
    ) -> torch.Tensor:
        """The gated residual of kept tokens: ``[..., h]`` inputs/outputs, ``[...]`` fp32 gates."""
        dtype = layer_input.dtype
        delta = layer_output - layer_input
        if gate_mode == "scale":
            return layer_input + gates.to(dtype)[..., None] * delta
        if gate_mode == "straight_through":
            zero_with_gradient = gates - gates.detach()
            return layer_output + delta * zero_with_gradient.to(dtype)[..., None]
        raise ValueError(f"unknown gate mode {gate_mode!r}; use 'scale' or 'straight_through'")

    @staticmethod
    def _expand(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return index[..., None].expand(-1, -1, like.shape[-1])
