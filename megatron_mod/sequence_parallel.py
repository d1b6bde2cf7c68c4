"""Sequence-parallel dispatch for routed layers: move only the kept tokens between TP ranks.

Under sequence parallelism each tensor-parallel rank holds ``L = s/tp`` consecutive tokens of
every sequence, and the layer's compact batch must arrive split the same way: rank ``r`` holds
compact slots ``[r*Lc, (r+1)*Lc)`` with ``Lc = s_c/tp``. The simple route all-gathers the full
hidden states (``s`` tokens), compacts, and later all-gathers the layer output (``s_c``) to
scatter it back: ``s + 5*s_c`` tokens of traffic per routed layer and pass, against ``4*s`` for a
dense SP layer (the layer's own two all-gathers and two reduce-scatters). Here every rank routes
the full sequence from the gathered logits (``s`` floats) and computes the same plan; then one
all-to-all sends each kept token straight from the rank that holds it to the rank that owns its
compact slot, and one all-to-all brings the layer's output back. Each rank receives about
``s_c/tp`` rows in each exchange instead of ``s`` or ``s_c`` in an all-gather (numbers in
docs/design.md, "Sequence parallelism").

The compact length and the per-rank-pair token counts are read to the host together: the one
host synchronisation of a routed layer (all-to-all split sizes must be host integers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.tensor_parallel.mappings import all_to_all

from megatron_mod.dispatcher import DispatchState, MoDTokenDispatcher

__all__ = ["SequenceParallelPlan", "SequenceParallelTokenExchange"]


@dataclass
class SequenceParallelPlan:
    """Who sends which kept token where, for one routed layer and micro-batch."""

    state: DispatchState
    """The global compact layout (identical on every TP rank): RoPE positions, masks, gates."""
    send_rows: torch.Tensor
    """[n_send] rows of this rank's flattened ``[L*b]`` tokens, ordered by destination rank."""
    send_splits: list[int]
    """Rows sent to each TP rank."""
    recv_slots: torch.Tensor
    """[n_recv] rows of this rank's flattened ``[Lc*b]`` compact shard, ordered by source rank."""
    recv_splits: list[int]
    """Rows received from each TP rank."""
    local_compact_len: int
    """``Lc``: compact slots per sequence on this rank."""


class SequenceParallelTokenExchange:
    """Dispatch/combine of a routed layer under sequence parallelism (all-to-all of kept tokens).

    Args:
        pad_to_multiple: compact-length multiple; must be a multiple of the TP size.
    """

    def __init__(self, pad_to_multiple: int):
        self.pad_to_multiple = pad_to_multiple

    def plan(self, keep: torch.Tensor, group) -> SequenceParallelPlan:
        """Plan the exchange from the full-sequence keep mask ``[s, b]`` (same on all ranks)."""
        tp = torch.distributed.get_world_size(group)
        rank = torch.distributed.get_rank(group)
        if self.pad_to_multiple % tp:
            raise ValueError(
                f"compact-length multiple {self.pad_to_multiple} is not a multiple of the "
                f"tensor-parallel size {tp}"
            )
        seq_len, batch = keep.shape
        if seq_len % tp:
            raise ValueError(f"sequence length {seq_len} is not divisible by TP size {tp}")
        device = keep.device
        local_len = seq_len // tp
        kept = keep.sum(dim=0)
        multiple = self.pad_to_multiple
        compact_len = (kept.max().clamp(min=1) + multiple - 1) // multiple * multiple
        compact_len = compact_len.clamp(max=seq_len)
        local_compact_len = compact_len // tp

        order = torch.sort((~keep).to(torch.int8), dim=0, stable=True).indices  # slot -> token
        slot = torch.arange(seq_len, device=device)[:, None].expand(-1, batch)
        column = torch.arange(batch, device=device)[None, :].expand(seq_len, -1)
        valid = slot < kept[None, :]
        src = order // local_len
        dst = slot // local_compact_len
        pair = (src * tp + dst).masked_fill(~valid, tp * tp)  # tp*tp: a bin for padding
        counts = torch.zeros(tp * tp + 1, dtype=torch.long, device=device)
        counts.index_add_(0, pair.reshape(-1), torch.ones_like(pair.reshape(-1)))
        host = torch.cat([compact_len.reshape(1), counts[: tp * tp]]).tolist()  # the one sync
        compact_len_int, matrix = int(host[0]), host[1:]
        send_splits = [int(matrix[rank * tp + d]) for d in range(tp)]
        recv_splits = [int(matrix[s * tp + rank]) for s in range(tp)]

        # Each rank orders what it sends by (destination, sequence, slot) and what it receives by
        # (source, sequence, slot): the receiver's order within one source is the sender's order
        # within that destination. Sorting with a sentinel instead of boolean indexing keeps the
        # sizes known without another synchronisation.
        span = batch * seq_len
        flat_key = column * seq_len + slot
        sentinel = 2 * tp * span
        send_key = torch.where(valid & (src == rank), dst * span + flat_key, sentinel)
        send_pick = torch.argsort(send_key.reshape(-1))[: sum(send_splits)]
        token_rows = ((order - rank * local_len) * batch + column).reshape(-1)
        recv_key = torch.where(valid & (dst == rank), src * span + flat_key, sentinel)
        recv_pick = torch.argsort(recv_key.reshape(-1))[: sum(recv_splits)]
        slot_rows = ((slot - rank * local_compact_len) * batch + column).reshape(-1)

        state = DispatchState(
            index=order[:compact_len_int], valid=valid[:compact_len_int], kept_per_sequence=kept
        )
        return SequenceParallelPlan(
            state=state,
            send_rows=token_rows[send_pick],
            send_splits=send_splits,
            recv_slots=slot_rows[recv_pick],
            recv_splits=recv_splits,
            local_compact_len=compact_len_int // tp,
        )

    @staticmethod
    def dispatch(hidden_states: torch.Tensor, plan: SequenceParallelPlan, group) -> torch.Tensor:
        """This rank's ``[L, b, h]`` tokens -> its ``[Lc, b, h]`` compact shard (padding zeros)."""
        local_len, batch, hidden = hidden_states.shape
        flat = hidden_states.reshape(local_len * batch, hidden)
        sent = flat.index_select(0, plan.send_rows)
        received = all_to_all(group, sent, plan.recv_splits, plan.send_splits)
        shard = flat.new_zeros(plan.local_compact_len * batch, hidden)
        shard = shard.index_copy(0, plan.recv_slots, received)
        return shard.view(plan.local_compact_len, batch, hidden)

    @staticmethod
    def combine(
        hidden_states: torch.Tensor,
        layer_output: torch.Tensor,
        gates: torch.Tensor,
        plan: SequenceParallelPlan,
        gate_mode: str,
        group,
    ) -> torch.Tensor:
        """Bring the kept tokens' outputs home, gate them, and write them into place.

        Args:
            hidden_states: [L, b, h] this rank's layer input.
            layer_output: [Lc, b, h] the layer's output on this rank's compact shard.
            gates: [s, b] fp32 gates of the full sequence (this rank's rows are used).
            plan: from :meth:`plan`.
            gate_mode: ``scale`` or ``straight_through`` (see ``MoDTokenDispatcher.combine``).
            group: the tensor-parallel group.

        Returns:
            [L, b, h] new hidden states of this rank's tokens.
        """
        local_len, batch, hidden = hidden_states.shape
        rank = torch.distributed.get_rank(group)
        flat_out = layer_output.reshape(-1, hidden).index_select(0, plan.recv_slots)
        returned = all_to_all(group, flat_out, plan.send_splits, plan.recv_splits)
        flat_in = hidden_states.reshape(local_len * batch, hidden)
        kept_in = flat_in.index_select(0, plan.send_rows)
        local_gates = gates[rank * local_len : (rank + 1) * local_len].reshape(-1)
        kept_gates = local_gates.index_select(0, plan.send_rows)
        mixed = MoDTokenDispatcher.mix(kept_in, returned, kept_gates, gate_mode)
        return flat_in.index_copy(0, plan.send_rows, mixed).view(local_len, batch, hidden)
