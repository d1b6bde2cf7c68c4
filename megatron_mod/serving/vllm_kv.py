"""KV planning of a routed layer inside vLLM: its kept tokens only, in vLLM's own attention.

vLLM gives every request one block table shared by all layers and a slot per token position.
A routed layer keeps a *compact* cache in the same blocks: the ``j``-th token it computed for a
request sits at the request's logical slot ``j`` (``block_table[j // B] * B + j % B``), not at
the token's position. Attention over a request's kept tokens is then ordinary causal attention
over a sequence of ``n_kept`` tokens, which any vLLM attention backend computes with its own
kernel: each routed layer gets metadata rebuilt by the backend's own builder from a
``CommonAttentionMetadata`` of its kept tokens (query lengths = kept counts of the step,
sequence lengths = kept counts so far). Kept tokens carry RoPE at their original positions, so
the kernel never needs positions.

The count of kept tokens before a request's new tokens is stored per position slot in a small
int32 buffer per routed layer (``kept_through[slot]``: kept tokens of the request up to and
including that position), written for every token the layer sees, so chunked prefill, decode
and recomputation after preemption all read what earlier steps wrote, without per-request state.

With ``mod_skipped_kv`` every token writes K/V at its own position slot (as dense); the kept
tokens' queries are grouped into runs of consecutive kept tokens, each run a query block of the
request ending at its last position, so again the backend's causal kernel applies.

Memory: the blocks are vLLM's, allocated for every position; a routed layer fills only the first
``n_kept`` slots of a request's blocks (docs/serving.md: what per-layer block tables would save).
Blocks are not shareable between requests (a layer's block holds other positions than the
block's tokens), so prefix caching is turned off for these models (``vllm_plugin``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RoutedAttentionPlanner", "KeptPlan"]


@dataclass
class KeptPlan:
    """One routed layer's step: which tokens it computes and the attention metadata for them."""

    index: torch.Tensor
    """[n] rows of the step's flattened tokens that the layer computes, in order."""
    metadata: object
    """Backend metadata for those tokens (None: vLLM's profiling run, no metadata)."""
    slot_mapping: torch.Tensor | None
    """[n] cache slots the layer writes their K/V to."""
    kept_per_request: list[int]
    """Tokens computed per request of the step (host ints, for statistics and tests)."""
    write_only: bool = False
    """``skipped_kv`` with no kept token: the step's K/V are written, nothing is computed."""


class RoutedAttentionPlanner:
    """Builds a routed layer's per-step :class:`KeptPlan` and runs its attention with it.

    Args:
        attn: the layer's vLLM ``Attention`` module (its cache, backend and layer name).
        vllm_config: the engine's config (for the backend's metadata builder).
        skipped_kv: skipped tokens still write K/V (``mod_skipped_kv``).
    """

    def __init__(self, attn, vllm_config, skipped_kv: bool):
        self.attn = attn
        self.vllm_config = vllm_config
        self.skipped_kv = skipped_kv
        self.block_size = vllm_config.cache_config.block_size
        self._builder = None
        self._kept_through: torch.Tensor | None = None
        self.last_kept_per_request: list[int] = []
        """Per request of the last step, tokens this layer computed (tests, statistics)."""
        self.kept_tokens = 0
        """Tokens this layer computed since the engine started (host count, no sync)."""
        self.seen_tokens = 0
        """Tokens that reached this layer since the engine started."""

    # -- planning

    def plan(self, keep: torch.Tensor, positions: torch.Tensor) -> KeptPlan | None:
        """The step's plan for keep mask ``keep`` [T] (None: no token computes the layer).

        Raises:
            NotImplementedError: speculative decoding or another multi-metadata mode.
        """
        from vllm.forward_context import get_forward_context

        context = get_forward_context()
        name = self.attn.layer_name
        metadata = context.attn_metadata
        if isinstance(metadata, list):
            raise NotImplementedError(
                "llama_mod in vLLM does not support speculative decoding (several attention "
                "metadata per step); serve without --speculative-config"
            )
        if isinstance(metadata, dict):
            metadata = metadata.get(name)
        if metadata is None:  # profiling / dummy run: no cache to plan for
            index = torch.arange(keep.shape[0], device=keep.device)
            return KeptPlan(index, None, None, [keep.shape[0]])
        slots = context.slot_mapping[name]
        num_tokens = int(metadata.num_actual_tokens)
        keep = keep[:num_tokens]
        request_starts = metadata.query_start_loc.long()
        seq_lens = metadata.seq_lens.long()
        block_table = metadata.block_table
        num_requests = seq_lens.shape[0]
        token_request = torch.bucketize(
            torch.arange(num_tokens, device=keep.device), request_starts[1 : num_requests + 1],
            right=True,
        )  # fmt: skip
        kept_int = keep.long()
        running = torch.cat([kept_int.new_zeros(1), kept_int.cumsum(0)])
        kept_per_request = running[request_starts[1:]] - running[request_starts[:-1]]
        if self.skipped_kv:
            return self._plan_with_skipped_kv(
                keep, positions[:num_tokens], token_request, block_table, slots[:num_tokens],
                kept_per_request,
            )  # fmt: skip
        kept_through = self._kept_through_buffer(keep.device)
        query_lens = request_starts[1:] - request_starts[:-1]
        first_position = seq_lens - query_lens
        before_slot = self._slot(block_table, (first_position - 1).clamp(min=0))
        kept_before = torch.where(
            first_position > 0, kept_through[before_slot].long(), torch.zeros_like(seq_lens)
        )
        within = running[1:] - running[request_starts[:-1]][token_request]  # inclusive
        kept_so_far = kept_before[token_request] + within
        kept_through[slots[:num_tokens].long()] = kept_so_far.to(kept_through.dtype)

        counts, totals = torch.stack([kept_per_request, kept_before + kept_per_request]).tolist()
        self._count(counts, num_tokens)
        total = sum(counts)
        if total == 0:
            return None
        index = torch.sort((~keep).to(torch.int8), stable=True).indices[:total]
        compact_slot = self._slot(block_table[token_request[index]], kept_so_far[index] - 1)
        rows = [r for r, n in enumerate(counts) if n > 0]
        built = self._build(
            block_table, rows, [counts[r] for r in rows], [totals[r] for r in rows], compact_slot
        )
        return KeptPlan(index, built, compact_slot, counts)

    def _plan_with_skipped_kv(
        self, keep, positions, token_request, block_table, slots, kept_per_request
    ) -> KeptPlan | None:
        """Runs of consecutive kept tokens, each a causal query block ending at its position."""
        num_tokens = keep.shape[0]
        previous_kept = torch.cat([keep.new_zeros(1), keep[:-1]])
        new_request = torch.cat(
            [keep.new_ones(1), token_request[1:] != token_request[:-1]]
        )  # fmt: skip
        run_start = keep & (new_request | ~previous_kept)
        run_id = run_start.long().cumsum(0) - 1
        counts = kept_per_request.tolist()
        self._count(counts, num_tokens)
        total = sum(counts)
        if total == 0:  # the skipped tokens' K/V are still written
            empty = torch.zeros(0, dtype=torch.long, device=keep.device)
            return KeptPlan(empty, None, None, counts, write_only=True)
        index = torch.sort((~keep).to(torch.int8), stable=True).indices[:total]
        runs = run_id[index]
        num_runs = int(runs[-1]) + 1
        run_lengths = torch.zeros(num_runs, dtype=torch.long, device=keep.device)
        run_lengths.index_add_(0, runs, torch.ones_like(runs))
        run_end = torch.zeros(num_runs, dtype=torch.long, device=keep.device)
        run_end.index_copy_(0, runs, positions[index].long())  # the last write of a run wins
        run_request = torch.zeros(num_runs, dtype=torch.long, device=keep.device)
        run_request.index_copy_(0, runs, token_request[index])
        lengths, ends, requests = torch.stack([run_lengths, run_end, run_request]).tolist()
        del num_tokens
        built = self._build(
            block_table, requests, lengths, [e + 1 for e in ends], slots[index].long()
        )
        return KeptPlan(index, built, slots[index].long(), counts)

    # -- running

    def attend(self, plan: KeptPlan, query, key, value, all_keys=None, all_values=None):
        """vLLM attention of the plan's tokens (``query``/``key``/``value`` for them only).

        ``all_keys``/``all_values``: with ``skipped_kv``, K/V of every real token of the step,
        written at their own slots first.
        """
        if plan.metadata is None:
            return self.attn(query, key, value)
        from vllm.forward_context import get_forward_context

        context = get_forward_context()
        name = self.attn.layer_name
        if all_keys is not None:
            self.write_kv(all_keys, all_values)
        saved = (context.attn_metadata[name], context.slot_mapping[name])
        context.attn_metadata[name] = plan.metadata
        context.slot_mapping[name] = plan.slot_mapping
        try:
            return self.attn(query, key, value)
        finally:
            context.attn_metadata[name], context.slot_mapping[name] = saved

    def write_kv(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """``skipped_kv``: write the K/V of every real token of the step at its own slot."""
        from vllm.forward_context import get_forward_context

        context = get_forward_context()
        impl = self.attn.impl
        if getattr(self.attn.attn_backend, "forward_includes_kv_cache_update", False) or (
            not hasattr(impl, "do_kv_cache_update")
        ):
            raise NotImplementedError(
                f"mod_skipped_kv needs an attention backend with a separate KV cache update; "
                f"{type(impl).__name__} has none. Serve this export with kept-only K/V "
                f"(mod_skipped_kv false) or another backend"
            )
        heads, head_size = self.attn.num_kv_heads, self.attn.head_size
        num_tokens = int(self._original_metadata(context).num_actual_tokens)
        impl.do_kv_cache_update(
            self.attn,
            keys[:num_tokens].view(-1, heads, head_size),
            values[:num_tokens].view(-1, heads, head_size),
            self.attn.kv_cache,
            context.slot_mapping[self.attn.layer_name][:num_tokens],
        )

    # -- helpers

    def _count(self, counts: list[int], num_tokens: int) -> None:
        self.last_kept_per_request = counts
        self.kept_tokens += sum(counts)
        self.seen_tokens += num_tokens

    def _original_metadata(self, context):
        metadata = context.attn_metadata
        return metadata[self.attn.layer_name] if isinstance(metadata, dict) else metadata

    def _slot(self, block_table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Cache slot of logical index ``index`` in each row of ``block_table``."""
        blocks = block_table.gather(-1, (index // self.block_size).unsqueeze(-1)).squeeze(-1)
        return blocks.long() * self.block_size + index % self.block_size

    def _kept_through_buffer(self, device) -> torch.Tensor:
        cache = self.attn.kv_cache
        if isinstance(cache, (list, tuple)):
            cache = cache[0]
        # Both K and V of every slot: 2 * kv_heads * head_size elements per slot, whatever the
        # backend's layout.
        per_slot = 2 * self.attn.num_kv_heads * self.attn.head_size
        num_slots = cache.numel() // per_slot
        if self._kept_through is None or self._kept_through.numel() != num_slots:
            self._kept_through = torch.zeros(num_slots, dtype=torch.int32, device=device)
        return self._kept_through

    def _build(self, block_table, rows, query_lens, seq_lens, slot_mapping):
        """Backend metadata for requests ``rows`` (block-table rows) with these lengths."""
        from vllm.v1.attention.backend import CommonAttentionMetadata

        device = block_table.device
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        starts_cpu = torch.tensor(starts, dtype=torch.int32)
        seq_cpu = torch.tensor(seq_lens, dtype=torch.int32)
        common = CommonAttentionMetadata(
            query_start_loc=starts_cpu.to(device),
            query_start_loc_cpu=starts_cpu,
            seq_lens=seq_cpu.to(device),
            num_reqs=len(rows),
            num_actual_tokens=starts[-1],
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            block_table_tensor=block_table[torch.tensor(rows, device=device)],
            slot_mapping=slot_mapping,
            causal=True,
            seq_lens_cpu_upper_bound=seq_cpu,
        )
        return self._metadata_builder(device).build(0, common)

    def _metadata_builder(self, device):
        if self._builder is None:
            spec = self.attn.get_kv_cache_spec(self.vllm_config)
            builder_cls = self.attn.attn_backend.get_builder_cls()
            self._builder = builder_cls(spec, [self.attn.layer_name], self.vllm_config, device)
        return self._builder
