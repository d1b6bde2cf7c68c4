"""Held-out evaluation of a megatron-mod checkpoint: loss, perplexity, kept fractions, c_eff.

The model is loaded for inference only (no DDP wrapper, no optimizer) under any layout: one
process, or tensor / pipeline / data parallel under ``torchrun``. The data is a Megatron blend
read through megatron-core's ``BlendedMegatronDatasetBuilder`` + ``GPTDataset``, split as in
training (``--split``), so ``--split-name valid`` evaluates on the same held-out samples the
trainer's validation uses. The routing threshold (or top-k capacity) may be changed to see how
loss and compute trade off without retraining.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

__all__ = ["parse_args", "evaluate_checkpoint"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (the trainer's names)."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--load", required=True, help="megatron-mod checkpoint directory")
    p.add_argument("--iteration", type=int, help="iteration to load (default: latest)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data-path", nargs="+", help="blend: 'w1 prefix1 w2 prefix2 ...'")
    src.add_argument("--data-args-path", help="file holding the --data-path blend")
    p.add_argument("--split", default="969,30,1", help="train,valid,test weights (as trained)")
    p.add_argument(
        "--split-name", default="valid", choices=("train", "valid", "test"), help="which split"
    )
    p.add_argument(
        "--tokenizer-model", help="HF tokenizer dir (default: the checkpoint's tokenizer)"
    )
    p.add_argument(
        "--tokenizer-type",
        default="HuggingFaceTokenizer",
        choices=("HuggingFaceTokenizer", "SentencePieceTokenizer"),
    )
    p.add_argument("--data-cache-path", help="where megatron-core caches dataset indices")
    p.add_argument("--eod-mask-loss", action="store_true", help="no loss on end-of-document")
    p.add_argument("--seed", type=int, default=1234, help="dataset shuffle seed (as trained)")
    p.add_argument("--seq-length", type=int, help="tokens per sample (default: the model's max)")
    p.add_argument("--micro-batch-size", type=int, default=4, help="sequences per micro-batch")
    p.add_argument(
        "--eval-iters",
        type=int,
        default=8,
        help="micro-batches per data-parallel rank (samples = this x micro batch x DP)",
    )
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--bf16", action="store_true", help="evaluate in bf16 (routers stay fp32)")
    g = p.add_argument_group("MoD overrides (default: the checkpoint's settings)")
    g.add_argument("--mod-routing", choices=("threshold", "topk"))
    g.add_argument("--mod-threshold", type=float, help="routing threshold p")
    g.add_argument("--mod-capacity", type=float, help="top-k capacity c")
    g.add_argument("--mod-gate", choices=("scale", "straight_through"))
    p.add_argument("--json-out", help="write the results here (JSON)")
    args = p.parse_args(argv)
    for name in ("eval_iters", "micro_batch_size", "seq_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def evaluate_checkpoint(args: argparse.Namespace) -> dict:
    """Load the checkpoint, evaluate it, print one line and return the results (all ranks)."""
    import torch
    from megatron.core import parallel_state

    from megatron_mod import platform
    from megatron_mod.atomic import write_text_atomic
    from megatron_mod.checkpointing import (
        load_model_checkpoint,
        read_checkpoint_metadata,
        resolve_iteration_dir,
    )
    from megatron_mod.config import MoDConfig
    from megatron_mod.data.datasets import build_gpt_datasets, read_data_args_file
    from megatron_mod.data.megatron_tokenizer import megatron_tokenizer
    from megatron_mod.training.loop import evaluate, format_kept
    from megatron_mod.training.pretrain import gpt_batches

    load = Path(args.load)
    metadata = read_checkpoint_metadata(load)
    iter_dir = resolve_iteration_dir(load, args.iteration)
    seq_length = args.seq_length or metadata.max_seq_len
    if seq_length > metadata.max_seq_len:
        raise ValueError(
            f"--seq-length {seq_length} exceeds the checkpoint's max_seq_len "
            f"{metadata.max_seq_len} ({load})"
        )
    changes = {
        f: getattr(args, f"mod_{f}")
        for f in ("routing", "threshold", "capacity", "gate")
        if getattr(args, f"mod_{f}") is not None
    }
    mod_config = metadata.mod_config
    if mod_config is None and changes:
        raise ValueError(f"--load {load} is a dense checkpoint; --mod-* flags do not apply")
    if mod_config is not None:
        mod_config = MoDConfig.from_cli_args(args, base=mod_config)
    tokenizer_dir = args.tokenizer_model or (
        str(load / metadata.tokenizer_dir) if metadata.tokenizer_dir else None
    )
    if tokenizer_dir is None:
        raise ValueError(f"{load} records no tokenizer; pass --tokenizer-model DIR")
    if args.sequence_parallel and args.tensor_model_parallel_size == 1:
        raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1")
    blend = args.data_path or read_data_args_file(args.data_args_path)

    platform.initialize(
        tp=args.tensor_model_parallel_size,
        pp=args.pipeline_model_parallel_size,
        seed=args.seed,
    )
    overrides = {"sequence_parallel": True} if args.sequence_parallel else {}
    if args.bf16:
        overrides["bf16"] = True
    model, metadata = load_model_checkpoint(
        load, iteration=args.iteration, mod_config=mod_config, dense=mod_config is None,
        **overrides,
    )  # fmt: skip
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    samples = args.eval_iters * args.micro_batch_size * dp_size
    index = ("train", "valid", "test").index(args.split_name)
    num_samples = [1, 1, 1]
    num_samples[index] = samples
    datasets = build_gpt_datasets(
        blend,
        megatron_tokenizer(args.tokenizer_type, tokenizer_dir),
        seq_length=seq_length,
        num_samples=tuple(num_samples),
        split=args.split,
        seed=args.seed,
        path_to_cache=args.data_cache_path,
        eod_mask_loss=args.eod_mask_loss,
        is_built_on_rank=lambda: True,
    )
    dataset = datasets[index]
    if dataset is None:
        raise ValueError(f"--split {args.split} leaves no {args.split_name} data")
    result = evaluate(
        model,
        gpt_batches(dataset, args.micro_batch_size, 0, dp_rank, dp_size),
        args.eval_iters,
        args.micro_batch_size,
        seq_length,
        metadata.num_layers,
    )
    out = {
        "checkpoint": str(iter_dir),
        "split": args.split_name,
        "samples": samples,
        "tokens": samples * seq_length,
        "seq_length": seq_length,
        "lm_loss": result.lm_loss,
        "perplexity": math.exp(result.lm_loss) if result.lm_loss < 700 else math.inf,
        "c_eff": result.c_eff,
        "kept_fraction": result.kept_fraction,
        "mean_gate": result.mean_gate,
        "mod": mod_config.to_dict() if mod_config else None,
        "layout": {
            "tensor_model_parallel_size": args.tensor_model_parallel_size,
            "pipeline_model_parallel_size": args.pipeline_model_parallel_size,
            "data_parallel_size": dp_size,
        },
    }
    if torch.distributed.get_rank() == 0:
        mod = (
            "dense"
            if mod_config is None
            else ", ".join(f"{k} {v}" for k, v in dataclasses.asdict(mod_config).items() if k in (
                "routing", "threshold", "capacity", "gate"))
        )  # fmt: skip
        print(
            f" evaluation ({args.split_name}, {samples} samples) | lm loss {result.lm_loss:.4f} | "
            f"ppl {out['perplexity']:.3f} | c_eff {result.c_eff:.3f} | "
            f"kept {format_kept(result.kept_fraction)} | {iter_dir} | {mod}",
            flush=True,
        )
        if args.json_out:
            Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(args.json_out, json.dumps(out, indent=1))
    platform.destroy()
    return out
