"""Load converted megatron-mod checkpoints under this run's TP/PP (torchrun, gloo) and report.

For each ``--ckpt``: load it with ``load_model_checkpoint`` (resharding the TP=1 torch_dist
checkpoint), check that every local parameter equals ``mapping.tp_shard`` of the HF source tensor
(or of the router stored in the checkpoint), run one forward pass through the pipeline stages
(p2p send/recv between stages) and save the full-vocabulary logits and per-layer kept fractions
to ``{out}/{name}.pt`` (written by the rank holding TP rank 0 of the last stage).
``--save NAME=DIR`` saves the loaded model of ``NAME`` again with ``save_model_checkpoint`` under
this run's TP/PP: a checkpoint whose tensors are stored as per-rank chunks, as training writes it.

Usage: torchrun --nproc_per_node=N convert_load_check.py --tp T --pp P --hf-dir HF
           --ckpt NAME=DIR [--ckpt NAME=DIR ...] [--hf NAME=HF_DIR ...] --tokens TOKENS.pt
           --out OUTDIR [--save NAME=DIR]
"""

from __future__ import annotations

import argparse
import os

import torch


def _check_weights(model, metadata, hf_dir: str, routers: dict) -> int:
    """Compare each local parameter with the mapping's TP slice of the HF tensor(s)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from megatron_mod.hf.io import HFCheckpointReader
    from megatron_mod.hf.mapping import canonical_megatron_name, param_mappings, tp_shard

    dims = metadata.dims()
    mappings = {m.megatron_name: m for m in param_mappings(dims, metadata.routed_layers())}
    reader = HFCheckpointReader(hf_dir)
    offset = get_transformer_layer_offset(model.config)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    checked = 0
    for name, param in model.named_parameters():
        name = canonical_megatron_name(name)
        if name.startswith("decoder.layers."):
            parts = name.split(".")
            parts[2] = str(int(parts[2]) + offset)  # local -> global layer index
            name = ".".join(parts)
        if ".router." in name:
            full = routers[name]
        else:
            if name == "output_layer.weight" and dims.tied:
                # A tied model's last PP stage holds a copy of the input embedding.
                name = "embedding.word_embeddings.weight"
            mapping = mappings[name]
            hf = reader.get(mapping.hf_names)
            full = mapping.to_megatron([hf[n] for n in mapping.hf_names])
        expected = tp_shard(name, full, tp, rank, dims)
        if not torch.equal(param.detach(), expected.to(param.device, param.dtype)):
            raise AssertionError(f"{name}: TP rank {rank} slice differs from tp_shard(HF)")
        checked += 1
    return checked


def _forward(model, tokens: torch.Tensor) -> torch.Tensor | None:
    """One forward pass through the pipeline; logits on the last stage, else None."""
    from megatron.core import parallel_state

    from megatron_mod import platform

    device = platform.device()
    tokens = tokens.to(device)
    batch, seq = tokens.shape
    positions = torch.arange(seq, device=device)[None].expand(batch, -1)
    if not parallel_state.is_pipeline_first_stage():
        hidden = torch.empty(seq, batch, model.config.hidden_size, device=device)
        torch.distributed.recv(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    out = model(tokens, positions, None, runtime_gather_output=True)
    if not parallel_state.is_pipeline_last_stage():
        torch.distributed.send(
            out.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank()
        )
        return None
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, required=True)
    p.add_argument("--pp", type=int, required=True)
    p.add_argument("--hf-dir", default=None, help="HF source of every --ckpt without --hf")
    p.add_argument("--hf", action="append", default=[], help="NAME=DIR: HF source of one ckpt")
    p.add_argument("--ckpt", action="append", required=True, help="NAME=DIR")
    p.add_argument("--tokens", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--save", action="append", default=[], help="NAME=DIR: re-save under TP/PP")
    args = p.parse_args()
    save_to = dict(spec.split("=", 1) for spec in args.save)
    hf_dirs = dict(spec.split("=", 1) for spec in args.hf)

    from megatron.core import parallel_state

    from megatron_mod import platform
    from megatron_mod.checkpointing import (
        load_model_checkpoint,
        model_sharded_state_dict,
        resolve_iteration_dir,
        save_model_checkpoint,
    )
    from megatron_mod.checkpointing.streaming import read_checkpoint_tensors
    from megatron_mod.layer import MoDTransformerLayer

    platform.initialize(tp=args.tp, pp=args.pp)
    tokens = torch.load(args.tokens, weights_only=True)
    for spec in args.ckpt:
        name, ckpt = spec.split("=", 1)
        model, metadata = load_model_checkpoint(ckpt, tp=args.tp, pp=args.pp)
        model.eval()
        # Routers have no HF source: compare with the checkpoint's full tensors.
        router_items = {n: v for n, v in model_sharded_state_dict(model).items() if ".router." in n}
        stored = read_checkpoint_tensors(resolve_iteration_dir(ckpt), router_items)
        routers = {router_items[n].key: t for n, t in stored.items()}
        checked = _check_weights(model, metadata, hf_dirs.get(name, args.hf_dir), routers)
        with torch.no_grad():
            logits = _forward(model, tokens)
        kept = {
            layer.global_layer_index: float(layer.last_keep.float().mean())
            for layer in model.modules()
            if isinstance(layer, MoDTransformerLayer)
        }
        all_kept = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(all_kept, kept)
        merged = {k: v for d in all_kept for k, v in d.items()}
        if (
            parallel_state.is_pipeline_last_stage()
            and parallel_state.get_tensor_model_parallel_rank() == 0
        ):
            result = {"logits": logits, "kept": merged, "params_checked": checked}
            torch.save(result, os.path.join(args.out, f"{name}.pt"))
        torch.distributed.barrier()
        if name in save_to:
            metadata.tensor_model_parallel_size = args.tp
            metadata.pipeline_model_parallel_size = args.pp
            save_model_checkpoint(model, save_to[name], metadata)
        del model
    platform.destroy()


if __name__ == "__main__":
    main()
