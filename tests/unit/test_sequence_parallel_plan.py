"""The sequence-parallel token exchange's plan, for every rank of simulated TP groups.

The all-to-all is replayed on the host from each rank's plan: what every rank sends must land
exactly in the compact slots the dispatcher's global layout gives each kept token, and the
split sizes must agree pairwise. The torchrun runs (tests/integration) then need to show only
that the collectives carry it.
"""

from __future__ import annotations

import pytest
import torch

from megatron_mod.sequence_parallel import SequenceParallelTokenExchange


def _plans(keep: torch.Tensor, tp: int, multiple: int, monkeypatch):
    exchange = SequenceParallelTokenExchange(pad_to_multiple=multiple)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: tp)
    plans = []
    for rank in range(tp):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None, r=rank: r)
        plans.append(exchange.plan(keep, group=None))
    return plans


@pytest.mark.parametrize("tp, seq, batch, multiple, keep_prob", [
    (2, 16, 3, 2, 0.5), (4, 32, 2, 4, 0.3), (4, 32, 2, 8, 0.9), (8, 64, 1, 8, 0.05),
    (2, 8, 2, 2, 1.0), (4, 16, 3, 4, 0.0),
])  # fmt: skip
def test_every_rank_sends_each_kept_token_to_its_compact_slot(
    tp, seq, batch, multiple, keep_prob, monkeypatch
):
    gen = torch.Generator().manual_seed(tp * seq + batch)
    keep = torch.rand(seq, batch, generator=gen) < keep_prob
    plans = _plans(keep, tp, multiple, monkeypatch)
    local_len = seq // tp
    hidden = torch.arange(seq * batch, dtype=torch.float32).view(seq, batch) + 1.0  # token ids

    # Every rank computes the same global layout.
    state = plans[0].state
    for plan in plans[1:]:
        assert torch.equal(plan.state.index, state.index)
        assert plan.local_compact_len == plans[0].local_compact_len
    compact_len = state.index.shape[0]
    assert compact_len % multiple == 0 or compact_len == seq
    assert compact_len >= int(keep.sum(dim=0).max())
    local_compact = plans[0].local_compact_len
    assert local_compact * tp == compact_len

    # Split sizes agree pairwise: what s sends to d is what d expects from s.
    for s in range(tp):
        for d in range(tp):
            assert plans[s].send_splits[d] == plans[d].recv_splits[s]

    # Replay the all-to-all: rank s's rows for d, in order, fill d's slots from s, in order.
    shards = [torch.zeros(local_compact * batch) for _ in range(tp)]
    for s, plan in enumerate(plans):
        local = hidden[s * local_len : (s + 1) * local_len].reshape(-1)
        assert plan.send_rows.numel() == sum(plan.send_splits)
        sent = local[plan.send_rows].split(plan.send_splits)
        for d in range(tp):
            start = sum(plans[d].recv_splits[:s])
            slots = plans[d].recv_slots[start : start + plans[d].recv_splits[s]]
            shards[d][slots] = sent[d]
    compact = torch.cat([shard.view(local_compact, batch) for shard in shards])

    expected = torch.gather(hidden, 0, state.index).masked_fill(~state.valid, 0.0)
    assert torch.equal(compact, expected)
    assert int(state.valid.sum()) == int(keep.sum())
