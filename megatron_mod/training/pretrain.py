"""Continued pretraining of a converted checkpoint on an indexed-dataset blend (one process).

The MoDification step: load a megatron-mod checkpoint written by
``tools/convert_hf_to_megatron.py`` (routers initialised, every token kept at the start), train it
with the language-model loss plus the layer load-reducing loss on a Megatron data blend
(``--data-path w1 prefix1 w2 prefix2 …`` or ``--data-args-path``) read through megatron-core's
``BlendedMegatronDatasetBuilder`` + ``GPTDataset``, evaluate on the validation split, and save a
checkpoint in the same format, ready for ``tools/convert_megatron_to_hf.py``.

This driver runs in one process (CPU or one GPU) on :func:`megatron_mod.training.loop.train`;
it is what the CPU quick-start runs. Routing settings that do not change the parameters
(threshold, gate, capacity, load-loss coefficient) may be overridden; the routed layers are fixed
by the checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    g = p.add_argument_group("training")
    g.add_argument("--seq-length", type=int, default=256, help="tokens per sample")
    g.add_argument("--micro-batch-size", type=int, default=4, help="sequences per micro-batch")
    g.add_argument("--num-microbatches", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--train-iters", type=int, default=50, help="optimizer steps")
    g.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=3e-5, help="final learning rate")
    g.add_argument("--lr-warmup-iters", type=int, default=5, help="linear warmup steps")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    g.add_argument("--clip-grad", type=float, default=1.0, help="gradient-norm clip (0: off)")
    g.add_argument("--eval-interval", type=int, default=0, help="evaluate every N steps (0: end)")
    g.add_argument("--eval-iters", type=int, default=4, help="validation micro-batches")
    g.add_argument("--log-interval", type=int, default=5, help="steps between log lines")
    g.add_argument("--tensorboard-dir", help="write TensorBoard scalars here")
    g.add_argument("--seed", type=int, default=1234, help="random seed")
    g = p.add_argument_group("MoD overrides (default: the checkpoint's settings)")
    g.add_argument("--mod-routing", choices=("threshold", "topk"))
    g.add_argument("--mod-threshold", type=float)
    g.add_argument("--mod-capacity", type=float)
    g.add_argument("--mod-gate", choices=("scale", "straight_through"))
    g.add_argument("--mod-load-loss-coeff", type=float)
    return p.parse_args(argv)


def gpt_batches(
    dataset, micro_batch_size: int, start: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless micro-batches from a megatron-core ``GPTDataset``/``BlendedDataset``.

    The builder has already shuffled the samples, so they are read in order (wrapping around);
    ``start`` resumes at a sample index.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset has no samples; use more data or a shorter --seq-length")
    index = start
    while True:
        samples = [dataset[(index + i) % n] for i in range(micro_batch_size)]
        index += micro_batch_size
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
    if save.resolve() == load.resolve():
        return  # a new iteration is added next to the loaded one
    if save.exists() and any(save.iterdir()):
        if not overwrite:
            raise FileExistsError(f"--save {save} is not empty; pass --overwrite to replace it")
        shutil.rmtree(save)


def pretrain(args: argparse.Namespace) -> dict:
    """Load, train, evaluate and save; returns a summary dict (also printed)."""
    from megatron_mod import platform
    from megatron_mod.checkpointing import load_model_checkpoint, save_model_checkpoint
    from megatron_mod.data.datasets import build_gpt_datasets, read_data_args_file
    from megatron_mod.data.megatron_tokenizer import megatron_tokenizer
    from megatron_mod.training.loop import TrainConfig, evaluate, train

    load, save = Path(args.load), Path(args.save)
    _prepare_save_dir(save, load, args.overwrite)
    platform.initialize(tp=1, pp=1, seed=args.seed)
    from megatron_mod.checkpointing import read_checkpoint_metadata

    metadata = read_checkpoint_metadata(load)
    mod_config = _mod_overrides(args, metadata)
    if args.seq_length > metadata.max_seq_len:
        raise ValueError(
            f"--seq-length {args.seq_length} exceeds the checkpoint's max_seq_len "
            f"{metadata.max_seq_len} ({load})"
        )
    model, metadata = load_model_checkpoint(load, mod_config=mod_config, dense=mod_config is None)
    num_layers = metadata.num_layers
    tokenizer_dir = args.tokenizer_model or (
        str(load / metadata.tokenizer_dir) if metadata.tokenizer_dir else None
    )
    if tokenizer_dir is None:
        raise ValueError(f"{load} records no tokenizer; pass --tokenizer-model DIR")

    cfg = TrainConfig(
        train_iters=args.train_iters,
        micro_batch_size=args.micro_batch_size,
        num_microbatches=args.num_microbatches,
        seq_length=args.seq_length,
        lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_iters=args.lr_warmup_iters,
        weight_decay=args.weight_decay,
        clip_grad=args.clip_grad,
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
            args.train_iters * args.micro_batch_size * args.num_microbatches,
            evals * args.eval_iters * args.micro_batch_size,
            0,
        ),
        split=args.split,
        seed=args.seed,
        path_to_cache=args.data_cache_path,
        eod_mask_loss=args.eod_mask_loss,
    )
    if valid_ds is None:
        raise ValueError(f"--split {args.split} leaves no validation data; give it a valid weight")

    def run_eval(label: str):
        result = evaluate(
            model,
            gpt_batches(valid_ds, args.micro_batch_size),
            args.eval_iters,
            args.micro_batch_size,
            args.seq_length,
            num_layers,
        )
        kept = " ".join(f"{k}:{v:.2f}" for k, v in sorted(result.kept_fraction.items()))
        print(
            f" validation ({label}) | lm loss {result.lm_loss:.4f} | "
            f"c_eff {result.c_eff:.3f} | kept {kept}",
            flush=True,
        )
        return result

    def hook(step):
        if args.eval_interval and step.iteration % args.eval_interval == 0:
            run_eval(f"iteration {step.iteration}")

    print(
        f"loaded {load}: {num_layers} layers, hidden {metadata.dims().hidden_size}, "
        f"MoD {mod_config.to_dict() if mod_config else 'dense'}",
        flush=True,
    )
    start = time.perf_counter()
    before = run_eval("before training")
    results = train(
        model,
        gpt_batches(train_ds, args.micro_batch_size),
        cfg,
        num_layers,
        step_hook=hook,
    )
    after = run_eval("after training")
    if mod_config is not None and mod_config.routing == "topk":
        decode_threshold = topk_decode_threshold(results)
        mod_config = dataclasses.replace(mod_config, topk_decode_threshold=decode_threshold)
        print(f"top-k decode threshold (mean smallest kept gate): {decode_threshold:.4f}")
    if mod_config is not None:
        metadata = dataclasses.replace(metadata, mod=mod_config.to_dict())
    if save.resolve() != load.resolve() and metadata.tokenizer_dir:
        shutil.copytree(load / metadata.tokenizer_dir, save / metadata.tokenizer_dir)
    if args.tokenizer_model and not metadata.tokenizer_dir:
        shutil.copytree(args.tokenizer_model, save / "tokenizer")
        metadata = dataclasses.replace(metadata, tokenizer_dir="tokenizer")
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
    }
    kept = ", ".join(f"layer {k}: {v:.2f}" for k, v in sorted(after.kept_fraction.items()))
    print(
        f"\nsummary: {summary['steps']} steps in {summary['seconds']} s | train lm loss "
        f"{summary['train_lm_loss_first']:.3f} -> {summary['train_lm_loss_last']:.3f} | "
        f"validation lm loss {before.lm_loss:.3f} -> {after.lm_loss:.3f} | c_eff {after.c_eff:.3f}"
        f"\nkept fraction per routed layer: {kept or 'none (dense)'}\nsaved {iter_dir}",
        flush=True,
    )
    platform.destroy()
    return summary
