"""Continued pretraining of a converted checkpoint on an indexed-dataset blend.

The MoDification step: load a megatron-mod checkpoint written by
``tools/convert_hf_to_megatron.py`` (routers initialised, every token kept at the start), train it
with the language-model loss plus the layer load-reducing loss on a Megatron data blend
(``--data-path w1 prefix1 w2 prefix2 …`` or ``--data-args-path``) read through megatron-core's
``BlendedMegatronDatasetBuilder`` + ``GPTDataset``, evaluate on the validation split, and save a
checkpoint in the same format, ready for ``tools/convert_megatron_to_hf.py``.

Runs in one process (CPU or one GPU) or on every rank of a ``torchrun`` launch, single- or
multi-node: tensor (``--tensor-model-parallel-size``, ``--sequence-parallel``), pipeline
(``--pipeline-model-parallel-size``) and data parallel (the remaining ranks), with megatron-core
DDP and the Megatron optimizer (``--use-distributed-optimizer`` shards its state). The checkpoint
loads and saves under any layout. Routing settings that do not change the parameters (threshold,
gate, capacity, load-loss coefficient) may be overridden; the routed layers are fixed by the
checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["gpt_batches", "parse_args", "pretrain", "topk_decode_threshold"]

# MoDConfig fields a run may change without changing the checkpoint's parameters.
_OVERRIDABLE_MOD_FIELDS = ("routing", "threshold", "capacity", "gate", "load_loss_coeff")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (``pretrain_gpt.py`` names where they exist)."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("checkpoints")
    g.add_argument("--load", required=True, help="megatron-mod checkpoint to start from")
    g.add_argument("--save", required=True, help="where to write the trained checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace a non-empty --save dir")
    g = p.add_argument_group("data")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--data-path", nargs="+", help="blend: 'w1 prefix1 w2 prefix2 ...'")
    src.add_argument("--data-args-path", help="file holding the --data-path blend")
    g.add_argument("--split", default="969,30,1", help="train,valid,test weights")
    g.add_argument(
        "--tokenizer-model",
        help="HF tokenizer dir (default: the tokenizer stored in the --load checkpoint)",
    )
    g.add_argument(
        "--tokenizer-type",
        default="HuggingFaceTokenizer",
        choices=("HuggingFaceTokenizer", "SentencePieceTokenizer"),
        help="kind of --tokenizer-model",
    )
    g.add_argument("--data-cache-path", help="where megatron-core caches dataset indices")
    g.add_argument("--eod-mask-loss", action="store_true", help="no loss on end-of-document")
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP size")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP size")
    g.add_argument("--sequence-parallel", action="store_true", help="sequence parallel (TP > 1)")
    g.add_argument(
        "--use-distributed-optimizer",
        action="store_true",
        help="shard optimizer state over data-parallel ranks",
    )
    g.add_argument(
        "--overlap-grad-reduce",
        action="store_true",
        help="overlap the data-parallel gradient reduction with backward",
    )
    g.add_argument("--bf16", action="store_true", help="bf16 weights (fp32 main weights, routers)")
    g = p.add_argument_group("training")
    g.add_argument("--seq-length", type=int, default=256, help="tokens per sample")
    g.add_argument("--micro-batch-size", type=int, default=4, help="sequences per micro-batch")
    g.add_argument(
        "--global-batch-size",
        type=int,
        help="sequences per optimizer step over all data-parallel ranks (default: micro-batch "
        "size x data-parallel size); a multiple of micro-batch size x DP",
    )
    g.add_argument("--train-iters", type=int, default=50, help="optimizer steps")
    g.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=3e-5, help="final learning rate")
    g.add_argument("--lr-warmup-iters", type=int, default=5, help="linear warmup steps")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    g.add_argument("--clip-grad", type=float, default=1.0, help="gradient-norm clip (0: off)")
    g.add_argument("--eval-interval", type=int, default=0, help="evaluate every N steps (0: end)")
    g.add_argument(
        "--eval-iters", type=int, default=4, help="validation steps of one global batch each"
    )
    g.add_argument("--log-interval", type=int, default=5, help="steps between log lines")
    g.add_argument("--tensorboard-dir", help="write TensorBoard scalars here")
    g.add_argument(
        "--summary-json", help="write the run summary and every step's metrics here (JSON)"
    )
    g.add_argument("--seed", type=int, default=1234, help="random seed")
    g = p.add_argument_group("MoD overrides (default: the checkpoint's settings)")
    g.add_argument("--mod-routing", choices=("threshold", "topk"))
    g.add_argument("--mod-threshold", type=float)
    g.add_argument("--mod-capacity", type=float)
    g.add_argument("--mod-gate", choices=("scale", "straight_through"))
    g.add_argument("--mod-load-loss-coeff", type=float)
    return p.parse_args(argv)


def gpt_batches(
    dataset,
    micro_batch_size: int,
    start: int = 0,
    data_parallel_rank: int = 0,
    data_parallel_size: int = 1,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless micro-batches of this data-parallel rank from a ``GPTDataset``/``BlendedDataset``.

    The builder has already shuffled the samples, so they are read in order (wrapping around),
    as Megatron-LM's pretraining sampler does: each run of ``micro_batch_size x
    data_parallel_size`` samples is one micro-batch per rank, rank ``r`` taking the ``r``-th
    slice. A global batch is therefore the same samples for any data-parallel size.

    Args:
        dataset: indexable samples with ``tokens``, ``labels``, ``loss_mask``, ``position_ids``.
        micro_batch_size: sequences per micro-batch.
        start: global sample index to start at (resuming).
        data_parallel_rank: this rank's index in its data-parallel group.
        data_parallel_size: ranks in the data-parallel group.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset has no samples; use more data or a shorter --seq-length")
    index = start + data_parallel_rank * micro_batch_size
    while True:
        samples = [dataset[(index + i) % n] for i in range(micro_batch_size)]
        index += micro_batch_size * data_parallel_size
        batch = {}
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            batch[key] = torch.stack([torch.as_tensor(s[key]) for s in samples])
        batch["tokens"], batch["labels"] = batch["tokens"].long(), batch["labels"].long()
        yield batch


def topk_decode_threshold(results, last_fraction: float = 0.25) -> float:
    """The gate threshold that stands in for top-k when decoding token by token.

    Top-k needs the whole sequence to rank it, which a decoder does not have. The smallest kept
    gate of each sequence, averaged over the layers and over the last ``last_fraction`` of the
    training steps (when routing has settled), is a threshold that keeps about the trained
    capacity; the export writes it as ``mod_topk_decode_threshold``.

    Args:
        results: the :class:`~megatron_mod.training.loop.StepResult` list of a top-k run.
        last_fraction: the share of final steps to average over.
    """
    steps = [r for r in results if r.kth_gate]
    if not steps:
        raise ValueError("no top-k routing statistics were recorded (is routing 'topk'?)")
    tail = steps[-max(1, int(len(steps) * last_fraction)) :]
    values = [v for r in tail for v in r.kth_gate.values()]
    return float(sum(values) / len(values))


def _mod_overrides(args: argparse.Namespace, metadata):
    from megatron_mod.config import MoDConfig

    base = metadata.mod_config
    changes = {
        f: getattr(args, f"mod_{f}")
        for f in _OVERRIDABLE_MOD_FIELDS
        if getattr(args, f"mod_{f}") is not None
    }
    if base is None:
        if changes:
            raise ValueError(
                f"--load {args.load} is a dense checkpoint; --mod-* flags do not apply"
            )
        return None
    return MoDConfig.from_dict({**base.to_dict(), **changes})


def _prepare_save_dir(save: Path, load: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``save`` without ``overwrite`` (every rank); rank 0 clears it."""
    if save.resolve() == load.resolve():
        return  # a new iteration is added next to the loaded one
    if save.exists() and any(save.iterdir()):
        if not overwrite:
            raise FileExistsError(f"--save {save} is not empty; pass --overwrite to replace it")
        if torch.distributed.get_rank() == 0:
            shutil.rmtree(save)
    torch.distributed.barrier()


def _num_microbatches(args: argparse.Namespace, data_parallel_size: int) -> int:
    per_pass = args.micro_batch_size * data_parallel_size
    global_batch = args.global_batch_size or per_pass
    if global_batch % per_pass:
        raise ValueError(
            f"--global-batch-size {global_batch} is not a multiple of --micro-batch-size "
            f"{args.micro_batch_size} x data-parallel size {data_parallel_size} = {per_pass}"
        )
    return global_batch // per_pass


def pretrain(args: argparse.Namespace) -> dict:
    """Load, train, evaluate and save; returns a summary dict (also printed by rank 0).

    Call it on every rank of a torchrun launch (or in one process).
    """
    from megatron.core import parallel_state

    from megatron_mod import platform
    from megatron_mod.atomic import write_text_atomic
    from megatron_mod.checkpointing import (
        load_model_checkpoint,
        read_checkpoint_metadata,
        save_model_checkpoint,
    )
    from megatron_mod.data.datasets import build_gpt_datasets, read_data_args_file
    from megatron_mod.data.megatron_tokenizer import megatron_tokenizer
    from megatron_mod.training.loop import (
        TrainConfig,
        evaluate,
        format_kept,
        format_kept_per_layer,
        train,
    )

    load, save = Path(args.load), Path(args.save)
    metadata = read_checkpoint_metadata(load)
    mod_config = _mod_overrides(args, metadata)
    if args.seq_length > metadata.max_seq_len:
        raise ValueError(
            f"--seq-length {args.seq_length} exceeds the checkpoint's max_seq_len "
            f"{metadata.max_seq_len} ({load})"
        )
    if args.sequence_parallel and args.tensor_model_parallel_size == 1:
        raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1")
    platform.initialize(
        tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size, seed=args.seed
    )
    rank = torch.distributed.get_rank()
    log = print if rank == 0 else (lambda *a, **k: None)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    num_microbatches = _num_microbatches(args, dp_size)
    global_batch = args.micro_batch_size * num_microbatches * dp_size
    _prepare_save_dir(save, load, args.overwrite)
    overrides = {"sequence_parallel": True} if args.sequence_parallel else {}
    if args.bf16:
        overrides["bf16"] = True
    model, metadata = load_model_checkpoint(
        load, mod_config=mod_config, dense=mod_config is None, **overrides
    )
    num_layers = metadata.num_layers
    tokenizer_dir = args.tokenizer_model or (
        str(load / metadata.tokenizer_dir) if metadata.tokenizer_dir else None
    )
    if tokenizer_dir is None:
        raise ValueError(f"{load} records no tokenizer; pass --tokenizer-model DIR")

    cfg = TrainConfig(
        train_iters=args.train_iters,
        micro_batch_size=args.micro_batch_size,
        num_microbatches=num_microbatches,
        seq_length=args.seq_length,
        lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_iters=args.lr_warmup_iters,
        weight_decay=args.weight_decay,
        clip_grad=args.clip_grad,
        use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_grad_reduce=args.overlap_grad_reduce,
        log_interval=args.log_interval,
        tensorboard_dir=args.tensorboard_dir,
    )
    evals = 1 + (args.train_iters // args.eval_interval if args.eval_interval else 0)
    blend = args.data_path or read_data_args_file(args.data_args_path)
    train_ds, valid_ds, _ = build_gpt_datasets(
        blend,
        megatron_tokenizer(args.tokenizer_type, tokenizer_dir),
        seq_length=args.seq_length,
        num_samples=(
            args.train_iters * global_batch,
            evals * args.eval_iters * global_batch,
            0,
        ),
        split=args.split,
        seed=args.seed,
        path_to_cache=args.data_cache_path,
        eod_mask_loss=args.eod_mask_loss,
        # Every rank reads its own micro-batches (memory-mapped, so cheap): tensor-parallel ranks
        # need the same tokens, and each pipeline stage's forward step draws a batch.
        is_built_on_rank=lambda: True,
    )
    if valid_ds is None:
        raise ValueError(f"--split {args.split} leaves no validation data; give it a valid weight")

    def run_eval(label: str):
        result = evaluate(
            model,
            gpt_batches(valid_ds, args.micro_batch_size, 0, dp_rank, dp_size),
            args.eval_iters * num_microbatches,
            args.micro_batch_size,
            args.seq_length,
            num_layers,
        )
        kept = format_kept(result.kept_fraction)
        log(
            f" validation ({label}) | lm loss {result.lm_loss:.4f} | "
            f"c_eff {result.c_eff:.3f} | kept {kept}",
            flush=True,
        )
        return result

    def hook(step):
        if args.eval_interval and step.iteration % args.eval_interval == 0:
            run_eval(f"iteration {step.iteration}")

    log(
        f"loaded {load}: {num_layers} layers, hidden {metadata.dims().hidden_size}, "
        f"MoD {mod_config.to_dict() if mod_config else 'dense'}\n"
        f"layout: TP {args.tensor_model_parallel_size}, PP {args.pipeline_model_parallel_size}, "
        f"DP {dp_size}{', SP' if args.sequence_parallel else ''}"
        f"{', distributed optimizer' if args.use_distributed_optimizer else ''} | global batch "
        f"{global_batch} = {args.micro_batch_size} x {num_microbatches} micro-batches x DP "
        f"{dp_size} | {'bf16' if args.bf16 else 'fp32'}",
        flush=True,
    )
    start = time.perf_counter()
    before = run_eval("before training")
    results = train(
        model,
        gpt_batches(train_ds, args.micro_batch_size, 0, dp_rank, dp_size),
        cfg,
        num_layers,
        step_hook=hook,
    )
    after = run_eval("after training")
    if mod_config is not None and mod_config.routing == "topk":
        decode_threshold = topk_decode_threshold(results)
        mod_config = dataclasses.replace(mod_config, topk_decode_threshold=decode_threshold)
        log(f"top-k decode threshold (mean smallest kept gate): {decode_threshold:.4f}")
    if mod_config is not None:
        metadata = dataclasses.replace(metadata, mod=mod_config.to_dict())
    metadata = dataclasses.replace(
        metadata,
        params_dtype="bfloat16" if args.bf16 else "float32",
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
    )
    copy_tokenizer = None
    if save.resolve() != load.resolve() and metadata.tokenizer_dir:
        copy_tokenizer = (load / metadata.tokenizer_dir, save / metadata.tokenizer_dir)
    if args.tokenizer_model and not metadata.tokenizer_dir:
        copy_tokenizer = (Path(args.tokenizer_model), save / "tokenizer")
        metadata = dataclasses.replace(metadata, tokenizer_dir="tokenizer")
    if copy_tokenizer and rank == 0:
        shutil.copytree(*copy_tokenizer, dirs_exist_ok=True)
    iter_dir = save_model_checkpoint(model, save, metadata, iteration=args.train_iters)
    summary = {
        "steps": len(results),
        "seconds": round(time.perf_counter() - start, 1),
        "train_lm_loss_first": results[0].lm_loss,
        "train_lm_loss_last": results[-1].lm_loss,
        "valid_lm_loss_before": before.lm_loss,
        "valid_lm_loss_after": after.lm_loss,
        "c_eff_after": after.c_eff,
        "kept_fraction_after": after.kept_fraction,
        "checkpoint": str(iter_dir),
        "layout": {
            "tensor_model_parallel_size": args.tensor_model_parallel_size,
            "pipeline_model_parallel_size": args.pipeline_model_parallel_size,
            "data_parallel_size": dp_size,
            "sequence_parallel": args.sequence_parallel,
            "use_distributed_optimizer": args.use_distributed_optimizer,
            "global_batch_size": global_batch,
            "num_microbatches": num_microbatches,
        },
        "step_metrics": [dataclasses.asdict(r) for r in results],
    }
    kept = format_kept_per_layer(after.kept_fraction)
    log(
        f"\nsummary: {summary['steps']} steps in {summary['seconds']} s | train lm loss "
        f"{summary['train_lm_loss_first']:.3f} -> {summary['train_lm_loss_last']:.3f} | "
        f"validation lm loss {before.lm_loss:.3f} -> {after.lm_loss:.3f} | c_eff {after.c_eff:.3f}"
        f"\nkept fraction per routed layer: {kept or 'none (dense)'}\nsaved {iter_dir}",
        flush=True,
    )
    if args.summary_json and rank == 0:
        Path(args.summary_json).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.summary_json, json.dumps(summary, indent=1))
    platform.destroy()
    return summary
