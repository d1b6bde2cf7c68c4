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

    Args:
        pad_to_multiple: the compact length is rounded up to this (the TP size under sequence
            parallelism, so the compact batch can be split across TP ranks).
    """

    def __init__(self, pad_to_multiple: int = 1):
        self.pad_to_multiple = max(1, pad_to_multiple)

    def dispatch(
        self, hidden_states: torch.Tensor, keep: torch.Tensor
    ) -> tuple[torch.Tensor, DispatchState]:
        """Gather kept tokens into a compact, right-padded batch.

        Args:
            hidden_states: [s, b, h] full-sequence hidden states.
            keep: [s, b] bool keep mask (at least one True).

        Returns:
            compact: [s_c, b, h]; padded slots hold (ignored) copies of skipped tokens.
            state: indices and validity mask for :meth:`combine`.
        """
        seq_len = keep.shape[0]
        kept_per_sequence = keep.sum(dim=0)
        compact_len = int(kept_per_sequence.max())
        compact_len = -(-compact_len // self.pad_to_multiple) * self.pad_to_multiple
        compact_len = min(compact_len, seq_len)
        # A stable sort of "skipped?" puts each sequence's kept tokens first, in original order.
        order = torch.sort((~keep).to(torch.int8), dim=0, stable=True).indices
        index = order[:compact_len]
        valid = torch.arange(compact_len, device=keep.device)[:, None] < kept_per_sequence[None, :]
        compact = hidden_states.gather(0, self._expand(index, hidden_states))
        return compact, DispatchState(index, valid, kept_per_sequence)

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
        (g / stopgrad(g) - 1), whose forward is exactly layer(h) and whose gradient still reaches
        the router. Skipped tokens (and padded slots) keep h.

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
        dtype = hidden_states.dtype
        compact_gates = gates.gather(0, state.index)
        delta = compact_output - compact_input
        if gate_mode == "scale":
            mixed = compact_input + compact_gates.to(dtype)[..., None] * delta
        elif gate_mode == "straight_through":
            unit = compact_gates / compact_gates.detach() - 1.0
            mixed = compact_output + delta * unit.to(dtype)[..., None]
        else:
            raise ValueError(f"unknown gate mode {gate_mode!r}; use 'scale' or 'straight_through'")
        mixed = torch.where(state.valid[..., None], mixed, compact_input)
        return hidden_states.scatter(0, self._expand(state.index, hidden_states), mixed)

    @staticmethod
    def _expand(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return index[..., None].expand(-1, -1, like.shape[-1])
