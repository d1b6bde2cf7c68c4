"""Per-rank communication of one routed layer vs the dense layer under sequence parallelism.

Run under torchrun with 2+ ranks (gloo). Builds one dense megatron-core ``TransformerLayer`` and
one ``MoDTransformerLayer`` with ``sequence_parallel=True`` (top-k routing, so the kept count is
exact), runs forward and backward on ``[s/tp, b, h]`` shards, and counts the bytes each rank
receives through the collectives megatron-core and megatron-mod call (all-gather,
reduce-scatter, all-to-all, all-reduce). Rank 0 writes JSON: per variant, the mean and the
largest over ranks of the data received, in token rows (bytes / (b * h * element size)).
"""

from __future__ import annotations

import argparse
import json
import os

import torch


class TrafficCounter:
    """Wraps megatron's collective entry points and sums the bytes this rank receives."""

    def __init__(self):
        self.bytes = 0
        self.calls: dict[str, int] = {}

    def _count(self, name: str, nbytes: int) -> None:
        self.bytes += nbytes
        self.calls[name] = self.calls.get(name, 0) + 1

    def install(self) -> None:
        from megatron.core.tensor_parallel import layers, mappings

        world = torch.distributed.get_world_size
        all_gather, reduce_scatter = (
            mappings.dist_all_gather_func,
            mappings.dist_reduce_scatter_func,
        )
        all_to_all, all_reduce = torch.distributed.all_to_all_single, torch.distributed.all_reduce

        def gathered(output, input_, group=None, **kw):
            n = world(group)
            self._count("all_gather", input_.numel() * input_.element_size() * (n - 1))
            return all_gather(output, input_, group=group, **kw)

        def scattered(output, input_, group=None, **kw):
            n = world(group)
            self._count("reduce_scatter", output.numel() * output.element_size() * (n - 1))
            return reduce_scatter(output, input_, group=group, **kw)

        def exchanged(output, input_, output_split_sizes=None, input_split_sizes=None, group=None,
                      **kw):  # fmt: skip
            rank = torch.distributed.get_rank(group)
            row = output[0].numel() * output.element_size() if output.shape[0] else 0
            own = (
                output_split_sizes[rank] if output_split_sizes else output.shape[0] // world(group)
            )
            self._count("all_to_all", (output.shape[0] - own) * row)
            return all_to_all(output, input_, output_split_sizes, input_split_sizes, group=group,
                              **kw)  # fmt: skip

        def reduced(tensor, *a, group=None, **kw):
            n = world(group)
            self._count("all_reduce", tensor.numel() * tensor.element_size() * 2 * (n - 1) // n)
            return all_reduce(tensor, *a, group=group, **kw)

        for module in (mappings, layers):  # each holds its own reference to the collective
            module.dist_all_gather_func = gathered
            module.dist_reduce_scatter_func = scattered
        torch.distributed.all_to_all_single = exchanged
        torch.distributed.all_reduce = reduced


def _layer(mod_config, seq):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.spec_utils import build_module

    from megatron_mod.models import llama_config
    from megatron_mod.specs import get_dense_layer_spec, get_mod_layer_spec

    torch.manual_seed(3)
    model_parallel_cuda_manual_seed(3)
    tp = torch.distributed.get_world_size()
    config = llama_config(
        "tiny", tensor_model_parallel_size=tp, sequence_parallel=True, hidden_size=128,
        num_attention_heads=4, num_query_groups=2, ffn_hidden_size=256,
    )  # fmt: skip
    spec = get_dense_layer_spec(False) if mod_config is None else get_mod_layer_spec(mod_config)
    layer = build_module(spec, config=config, layer_number=1)
    rope = RotaryEmbedding(kv_channels=config.kv_channels, rotary_percent=1.0, rotary_base=10000)
    return layer, rope(seq), config


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--capacities", default="0.125,0.25,0.5,1.0")
    p.add_argument("--multiple", type=int, default=1, help="compact_length_multiple")
    args = p.parse_args()

    from megatron_mod import platform
    from megatron_mod.config import MoDConfig

    tp = int(os.environ.get("WORLD_SIZE", "1"))
    platform.initialize(tp=tp, pp=1)
    counter = TrafficCounter()
    counter.install()
    rank = torch.distributed.get_rank()
    results = {"tp": tp, "seq": args.seq, "batch": args.batch, "rows": {}}
    variants = [("dense", None)] + [
        (
            f"c={c}",
            MoDConfig(
                routed_layers="all",
                routing="topk",
                capacity=float(c),
                router_init_std=1.0,  # random routing: kept tokens spread over the sequence
                compact_length_multiple=args.multiple,
            ),
        )
        for c in args.capacities.split(",")
    ]
    for name, mod_config in variants:
        layer, rope, config = _layer(mod_config, args.seq)
        gen = torch.Generator().manual_seed(rank)
        local = torch.randn(args.seq // tp, args.batch, config.hidden_size, generator=gen)
        local = local.to(platform.device()).requires_grad_()
        counter.bytes, counter.calls = 0, {}
        out, _ = layer(hidden_states=local, attention_mask=None, rotary_pos_emb=rope)
        forward = counter.bytes
        out.float().square().sum().backward()
        row = args.batch * config.hidden_size * local.element_size()
        per_rank = torch.tensor([forward, counter.bytes], dtype=torch.float64)
        gathered = [torch.zeros_like(per_rank) for _ in range(tp)]
        torch.distributed.all_gather_object(gathered, per_rank)
        stacked = torch.stack(gathered) / row
        results["rows"][name] = {
            "forward_token_rows_mean": float(stacked[:, 0].mean()),
            "forward_token_rows_max": float(stacked[:, 0].max()),
            "total_token_rows_mean": float(stacked[:, 1].mean()),
            "total_token_rows_max": float(stacked[:, 1].max()),
            "calls": dict(counter.calls),
        }
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    platform.destroy()


if __name__ == "__main__":
    main()
