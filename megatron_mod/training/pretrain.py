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

Long runs: ``--save-interval N`` writes a training checkpoint (model, optimizer, scheduler, RNG,
data position, arguments; :mod:`megatron_mod.training.checkpoint`) every N steps, keeping the
newest ``--keep-last``. Re-running the same command continues from the newest one in ``--save``;
arguments that would change the run's meaning are checked against the saved ones first.
``--exit-signal-handler`` turns SIGTERM into "finish the step, save, exit 0", and
``--exit-duration-in-mins`` does the same before a job's wall time runs out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = [
    "gpt_batches",
    "parse_args",
    "pretrain",
    "topk_decode_threshold",
    "check_resume_args",
    "MEANING_CHANGING_ARGS",
]

# MoDConfig fields a run may change without changing the checkpoint's parameters.
_OVERRIDABLE_MOD_FIELDS = (
    "routing",
    "threshold",
    "capacity",
    "gate",
    "load_loss_coeff",
    "compact_length_multiple",
)

# Resolved arguments a resumed run must share with the saved run: the model, the data and its
# order, the batch, the optimisation schedule and the routing. Layout, logging, checkpointing and
# the number of steps may change.
MEANING_CHANGING_ARGS = (
    "load",
    "data",
    "split",
    "seq_length",
    "global_batch_size",
    "seed",
    "tokenizer_model",
    "tokenizer_type",
    "eod_mask_loss",
    "bf16",
    "lr",
    "min_lr",
    "lr_warmup_iters",
    "lr_decay_iters",
    "lr_decay_style",
    "weight_decay",
    "clip_grad",
    *(f"mod_{f}" for f in _OVERRIDABLE_MOD_FIELDS),
    "mod_target_compute",
    "mod_target_warmup_steps",
    "mod_router_lr_mult",
    "mod_train_routers_only",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (``pretrain_gpt.py`` names where they exist)."""
    from megatron_mod.config import MoDConfig

    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("checkpoints")
    g.add_argument("--load", required=True, help="megatron-mod checkpoint to start from")
    g.add_argument("--save", required=True, help="where to write the trained checkpoint")
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --save dir (also one holding a run: start it over)",
    )
    g.add_argument(
        "--save-interval",
        type=int,
        default=0,
        help="write a training checkpoint every N steps (0: only at the end); re-running the "
        "same command resumes from the newest one",
    )
    g.add_argument(
        "--keep-last",
        type=int,
        default=0,
        help="keep only the newest K training checkpoints (0: keep all)",
    )
    g.add_argument(
        "--dist-ckpt-optim-fully-reshardable",
        action="store_true",
        help="save the distributed optimizer's state per parameter (gathered on DP rank 0) so "
        "it resumes under another TP/PP too; default: each rank's shard as is (DP changes only)",
    )
    g.add_argument(
        "--exit-signal-handler",
        action="store_true",
        help="on SIGTERM, finish the current step, save a checkpoint and exit 0",
    )
    g.add_argument(
        "--exit-duration-in-mins",
        type=float,
        help="save a checkpoint and exit 0 once the run has lasted this many minutes",
    )
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
    g.add_argument(
        "--transformer-impl",
        choices=("transformer_engine", "local"),
        help="layer implementation (default: transformer_engine when it imports, else local)",
    )
    g = p.add_argument_group("activation recomputation (memory for large models)")
    g.add_argument(
        "--recompute-granularity",
        choices=("full", "selective"),
        help="full: recompute whole layers in backward; selective: only the attention core",
    )
    g.add_argument(
        "--recompute-method",
        choices=("uniform", "block"),
        help="full recomputation: uniform (groups of --recompute-num-layers) or block (the "
        "first --recompute-num-layers layers of each pipeline stage)",
    )
    g.add_argument(
        "--recompute-num-layers", type=int, help="layers per group (uniform) or per stage (block)"
    )
    g = p.add_argument_group("training")
    g.add_argument("--seq-length", type=int, default=256, help="tokens per sample")
    g.add_argument("--micro-batch-size", type=int, default=4, help="sequences per micro-batch")
    g.add_argument(
        "--global-batch-size",
        type=int,
        help="sequences per optimizer step over all data-parallel ranks (default: micro-batch "
        "size x data-parallel size); a multiple of micro-batch size x DP",
    )
    length = g.add_mutually_exclusive_group()
    length.add_argument("--train-iters", type=int, help="optimizer steps (default 50)")
    length.add_argument(
        "--train-tokens",
        type=int,
        help="train on this many tokens: steps = ceil(tokens / (global batch x seq length))",
    )
    g.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=3e-5, help="final learning rate")
    g.add_argument("--lr-warmup-iters", type=int, default=5, help="linear warmup steps")
    g.add_argument(
        "--lr-decay-iters", type=int, help="steps to decay over (default: the training steps)"
    )
    g.add_argument(
        "--lr-decay-style",
        default="cosine",
        choices=("constant", "linear", "cosine", "inverse-square-root"),
        help="decay after warmup",
    )
    g.add_argument(
        "--on-nan",
        default="stop",
        choices=("skip", "stop"),
        help="a non-finite LM loss or gradient norm: skip that update, or stop with an error",
    )
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
    MoDConfig.add_cli_args(
        p,
        fields=_OVERRIDABLE_MOD_FIELDS,
        with_defaults=False,
        title="MoD overrides (default: the checkpoint's settings)",
    )
    g = p.add_argument_group("MoD training controls")
    g.add_argument(
        "--mod-target-compute",
        type=float,
        help="steer the load-loss coefficients so that c_eff (computed fraction over all "
        "layers) reaches this target (megatron_mod.training.controller)",
    )
    g.add_argument(
        "--mod-router-lr-mult",
        type=float,
        default=1.0,
        help="the routers' learning rates (peak and final) are this multiple of --lr/--min-lr",
    )
    g.add_argument(
        "--mod-train-routers-only",
        action="store_true",
        help="train the routers only, the base model frozen (Router-Tuning)",
    )
    g.add_argument(
        "--mod-target-warmup-steps",
        type=int,
        default=50,
        help="steps over which the compute target ramps down from 1.0",
    )
    args = p.parse_args(argv)
    _validate_args(p, args)
    return args


def _validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("save_interval", "keep_last"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    for name in ("train_iters", "train_tokens", "lr_decay_iters", "recompute_num_layers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.mod_router_lr_mult <= 0:
        parser.error("--mod-router-lr-mult must be > 0")
    if args.exit_duration_in_mins is not None and args.exit_duration_in_mins <= 0:
        parser.error("--exit-duration-in-mins must be > 0")
    if args.recompute_granularity == "full":
        if args.recompute_method is None or args.recompute_num_layers is None:
            parser.error(
                "--recompute-granularity full needs --recompute-method and --recompute-num-layers"
            )
    elif args.recompute_method is not None or args.recompute_num_layers is not None:
        parser.error(
            "--recompute-method/--recompute-num-layers apply to --recompute-granularity full"
        )


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

    Yields:
        ``{"tokens", "labels", "loss_mask", "position_ids"}``, ``[micro_batch_size, seq]``
        each, on the compute device (:func:`megatron_mod.platform.device`).
    """
    from megatron_mod import platform

    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset has no samples; use more data or a shorter --seq-length")
    device = platform.device()
    pin = device.type == "cuda"
    index = start + data_parallel_rank * micro_batch_size
    while True:
        samples = [dataset[(index + i) % n] for i in range(micro_batch_size)]
        index += micro_batch_size * data_parallel_size
        batch = {}
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            host = torch.stack([torch.as_tensor(s[key]) for s in samples])
            if key in ("tokens", "labels"):
                host = host.long()
            # Pinned host memory lets the copy to the GPU run asynchronously.
            batch[key] = (host.pin_memory() if pin else host).to(device, non_blocking=pin)
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
    if base is None:
        if any(getattr(args, f"mod_{f}") is not None for f in _OVERRIDABLE_MOD_FIELDS):
            raise ValueError(
                f"--load {args.load} is a dense checkpoint; --mod-* flags do not apply"
            )
        return None
    return MoDConfig.from_cli_args(args, base=base)


def _prepare_save_dir(save: Path, load: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``save`` without ``overwrite`` (every rank); rank 0 clears it."""
    if save.resolve() == load.resolve():
        return  # a new iteration is added next to the loaded one
    if save.exists() and any(save.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"--save {save} is not empty and holds no training checkpoint to resume; pass "
                "--overwrite to replace it"
            )
        if torch.distributed.get_rank() == 0:
            shutil.rmtree(save)
    torch.distributed.barrier()


def _world_size() -> int:
    """Ranks of this launch (torchrun's WORLD_SIZE; 1 for a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _num_microbatches(args: argparse.Namespace, data_parallel_size: int) -> int:
    per_pass = args.micro_batch_size * data_parallel_size
    global_batch = args.global_batch_size or per_pass
    if global_batch % per_pass:
        raise ValueError(
            f"--global-batch-size {global_batch} is not a multiple of --micro-batch-size "
            f"{args.micro_batch_size} x data-parallel size {data_parallel_size} = {per_pass}"
        )
    return global_batch // per_pass


def _resolved_args(args: argparse.Namespace, blend: list[str], data_parallel_size: int) -> dict:
    """The run's arguments with defaults resolved (what a resume is checked against)."""
    global_batch = _num_microbatches(args, data_parallel_size) * args.micro_batch_size
    global_batch *= data_parallel_size
    if args.train_tokens is not None:
        train_iters = math.ceil(args.train_tokens / (global_batch * args.seq_length))
    else:
        train_iters = args.train_iters or 50
    resolved = {k: v for k, v in vars(args).items()}
    resolved.update(
        load=str(Path(args.load).resolve()),
        data=list(blend),
        global_batch_size=global_batch,
        train_iters=train_iters,
        lr_decay_iters=args.lr_decay_iters or train_iters,
        tokenizer_model=str(Path(args.tokenizer_model).resolve()) if args.tokenizer_model else None,
    )
    return json.loads(json.dumps(resolved))  # JSON values only, as they are saved


def check_resume_args(saved: dict, current: dict, iter_dir: Path) -> None:
    """Refuse to continue a run whose meaning-changing arguments differ from the saved ones.

    Raises:
        ValueError: naming each differing argument with both values.
    """
    diffs = [
        f"--{key.replace('_', '-')}: saved {saved.get(key)!r}, now {current.get(key)!r}"
        for key in MEANING_CHANGING_ARGS
        if saved.get(key) != current.get(key)
    ]
    if diffs:
        raise ValueError(
            f"--save holds a run ({iter_dir}) whose arguments differ from this command's:\n  "
            + "\n  ".join(diffs)
            + "\nRe-run the saved command to continue it, or pass --overwrite (or another "
            "--save) to start a new run. With --train-iters changed, pass the saved "
            "--lr-decay-iters to keep the schedule."
        )


def pretrain(args: argparse.Namespace) -> dict:
    """Load (or resume), train, evaluate and save; returns a summary dict (printed by rank 0).

    Call it on every rank of a torchrun launch (or in one process).
    """
    from megatron.core import parallel_state

    from megatron_mod import platform
    from megatron_mod.atomic import write_text_atomic
    from megatron_mod.checkpointing import (
        build_model_from_metadata,
        load_model_checkpoint,
        read_checkpoint_metadata,
    )
    from megatron_mod.data.datasets import build_gpt_datasets, read_data_args_file
    from megatron_mod.data.megatron_tokenizer import megatron_tokenizer
    from megatron_mod.training import checkpoint as ckpt
    from megatron_mod.training.loop import (
        ExitSignalHandler,
        TrainConfig,
        evaluate,
        format_kept,
        format_kept_per_layer,
        train,
    )
    from megatron_mod.training.optimizer import setup_model_and_optimizer
    from megatron_mod.training.throughput import ModelFlops

    run_start = time.monotonic()
    # Installed first, so a SIGTERM while the model and data load is not lost either.
    exit_handler = ExitSignalHandler() if args.exit_signal_handler else None
    load, save = Path(args.load), Path(args.save)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if tp < 1 or pp < 1 or _world_size() % (tp * pp):
        raise ValueError(
            f"{_world_size()} ranks are not a multiple of tensor x pipeline parallel {tp} x {pp}"
        )
    if args.sequence_parallel and tp == 1:
        raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1")
    blend = args.data_path or read_data_args_file(args.data_args_path)
    resolved = _resolved_args(args, blend, _world_size() // (tp * pp))
    train_iters = resolved["train_iters"]

    # Everything cheap first: a resumed run is checked before any model or data is built.
    resume = None if args.overwrite else ckpt.find_training_checkpoint(save)
    if resume is not None:
        check_resume_args(resume[1].args, resolved, resume[0])
        ckpt.check_optimizer_compatible(
            resume[1],
            {
                "tensor_model_parallel_size": tp,
                "pipeline_model_parallel_size": pp,
                "data_parallel_size": _world_size() // (tp * pp),
            },
            args.use_distributed_optimizer,
            resume[0],
        )
        metadata = read_checkpoint_metadata(save)
    else:
        metadata = read_checkpoint_metadata(load)
    mod_config = _mod_overrides(args, metadata)
    if args.seq_length > metadata.max_seq_len:
        raise ValueError(
            f"--seq-length {args.seq_length} exceeds the checkpoint's max_seq_len "
            f"{metadata.max_seq_len} ({load})"
        )
    platform.initialize(tp=tp, pp=pp, seed=args.seed)
    rank = torch.distributed.get_rank()
    log = print if rank == 0 else (lambda *a, **k: None)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    num_microbatches = _num_microbatches(args, dp_size)
    global_batch = args.micro_batch_size * num_microbatches * dp_size
    if resume is None:
        _prepare_save_dir(save, load, args.overwrite)
    else:
        if rank == 0:
            stale = ckpt.clean_stale(save)
            if stale:
                log(f"removed what an interrupted save left in {save}: {', '.join(stale)}")
        torch.distributed.barrier()  # the iteration is in place before any rank reads it
    overrides = {"sequence_parallel": True} if args.sequence_parallel else {}
    if args.bf16:
        overrides["bf16"] = True
    if args.recompute_granularity:
        overrides.update(
            recompute_granularity=args.recompute_granularity,
            recompute_method=args.recompute_method,
            recompute_num_layers=args.recompute_num_layers,
        )
    dense = mod_config is None
    use_te = None if args.transformer_impl is None else args.transformer_impl != "local"
    if use_te:
        from megatron_mod.specs import have_transformer_engine

        if not have_transformer_engine():
            raise ValueError(
                "--transformer-impl transformer_engine: Transformer Engine does not import here; "
                "install it or use --transformer-impl local"
            )
    if resume is None:
        model, metadata = load_model_checkpoint(
            load, mod_config=mod_config, dense=dense, use_transformer_engine=use_te, **overrides
        )
    else:
        model = build_model_from_metadata(
            metadata, mod_config, dense, use_transformer_engine=use_te, **overrides
        )
    num_layers = metadata.num_layers
    tokenizer_dir = args.tokenizer_model or (
        str(load / metadata.tokenizer_dir) if metadata.tokenizer_dir else None
    )
    if resume is not None and not args.tokenizer_model and metadata.tokenizer_dir:
        tokenizer_dir = str(save / metadata.tokenizer_dir)
    if tokenizer_dir is None:
        raise ValueError(f"{load} records no tokenizer; pass --tokenizer-model DIR")

    cfg = TrainConfig(
        train_iters=train_iters,
        micro_batch_size=args.micro_batch_size,
        num_microbatches=num_microbatches,
        seq_length=args.seq_length,
        lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_iters=args.lr_warmup_iters,
        lr_decay_iters=resolved["lr_decay_iters"],
        lr_decay_style=args.lr_decay_style,
        weight_decay=args.weight_decay,
        clip_grad=args.clip_grad,
        use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_grad_reduce=args.overlap_grad_reduce,
        router_lr_mult=args.mod_router_lr_mult,
        train_routers_only=args.mod_train_routers_only,
        on_nan=args.on_nan,
        exit_signal_handler=args.exit_signal_handler,
        exit_duration_in_mins=args.exit_duration_in_mins,
        log_interval=args.log_interval,
        tensorboard_dir=args.tensorboard_dir,
    )
    evals = 1 + (train_iters // args.eval_interval if args.eval_interval else 0)
    train_ds, valid_ds, _ = build_gpt_datasets(
        blend,
        megatron_tokenizer(args.tokenizer_type, tokenizer_dir),
        seq_length=args.seq_length,
        num_samples=(
            train_iters * global_batch,
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

    # What every saved iteration records as the model config, and the tokenizer beside it.
    if mod_config is not None:
        metadata = dataclasses.replace(metadata, mod=mod_config.to_dict())
    metadata = dataclasses.replace(
        metadata,
        params_dtype="bfloat16" if args.bf16 else "float32",
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
    )
    if resume is None:
        copy_tokenizer = None
        if save.resolve() != load.resolve() and metadata.tokenizer_dir:
            copy_tokenizer = (load / metadata.tokenizer_dir, save / metadata.tokenizer_dir)
        if args.tokenizer_model and not metadata.tokenizer_dir:
            copy_tokenizer = (Path(args.tokenizer_model), save / "tokenizer")
            metadata = dataclasses.replace(metadata, tokenizer_dir="tokenizer")
        if copy_tokenizer and rank == 0:
            shutil.copytree(*copy_tokenizer, dirs_exist_ok=True)

    writer = None
    if args.tensorboard_dir and rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(args.tensorboard_dir)

    def run_eval(label: str, iteration: int):
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
        if writer is not None:
            writer.add_scalar("validation/lm loss", result.lm_loss, iteration)
            writer.add_scalar("validation/ppl", math.exp(min(result.lm_loss, 30.0)), iteration)
            writer.add_scalar("validation/c_eff", result.c_eff, iteration)
        return result

    controller = None
    if args.mod_target_compute is not None:
        from megatron_mod.training.controller import ComputeTargetConfig, ComputeTargetController

        if mod_config is None:
            raise ValueError("--mod-target-compute needs a MoD checkpoint (this one is dense)")
        # The layers read their coefficients from this MoDConfig, which the controller updates.
        controller = ComputeTargetController(
            mod_config,
            num_layers,
            ComputeTargetConfig(
                target=args.mod_target_compute, warmup_steps=args.mod_target_warmup_steps
            ),
        )
    training = setup_model_and_optimizer(model, cfg)
    ddp_model, optimizer, scheduler = training
    start_iteration, skipped = 0, 0
    state = None
    if resume is not None:
        state = ckpt.load_training_checkpoint(resume[0], model, optimizer, scheduler)
        start_iteration, skipped = state.iteration, state.skipped_iterations
        if controller is not None and state.controller is not None:
            controller.load_state_dict(state.controller)
        if state.consumed_samples != start_iteration * global_batch:
            raise ValueError(
                f"{resume[0]}: consumed samples {state.consumed_samples} != iteration "
                f"{start_iteration} x global batch {global_batch}"
            )

    saved = {"iteration": start_iteration if resume is not None else None}

    def save_checkpoint(iteration: int) -> Path:
        t0 = time.perf_counter()
        iter_dir = ckpt.save_training_checkpoint(
            save,
            model,
            optimizer,
            scheduler,
            metadata,
            ckpt.TrainState(
                iteration=iteration,
                consumed_samples=iteration * global_batch,
                scheduler={},
                args=resolved,
                layout={},
                skipped_iterations=skipped,
                controller=controller.state_dict() if controller is not None else None,
            ),
            keep_last=args.keep_last,
            optimizer_format=(
                "fully_reshardable" if args.dist_ckpt_optim_fully_reshardable else "dp_reshardable"
            ),
        )
        saved["iteration"] = iteration
        log(
            f"saved checkpoint {iter_dir} (iteration {iteration}) in "
            f"{time.perf_counter() - t0:.1f} s",
            flush=True,
        )
        return iter_dir

    def hook(step):
        nonlocal skipped
        skipped += step.skipped
        if controller is not None and not step.skipped:
            # Kept fractions are reduced over all ranks, so every rank sets the same coefficients.
            controller.update(step.kept_fraction)
        if args.eval_interval and step.iteration % args.eval_interval == 0:
            run_eval(f"iteration {step.iteration}", step.iteration)
        if step.exit_requested or (args.save_interval and step.iteration % args.save_interval == 0):
            save_checkpoint(step.iteration)

    log(
        f"loaded {save if resume else load}: {num_layers} layers, "
        f"hidden {metadata.dims().hidden_size}, "
        f"MoD {mod_config.to_dict() if mod_config else 'dense'}\n"
        f"layout: TP {tp}, PP {pp}, DP {dp_size}{', SP' if args.sequence_parallel else ''}"
        f"{', distributed optimizer' if args.use_distributed_optimizer else ''} | global batch "
        f"{global_batch} = {args.micro_batch_size} x {num_microbatches} micro-batches x DP "
        f"{dp_size} | {'bf16' if args.bf16 else 'fp32'}"
        f"{f' | recompute {args.recompute_granularity}' if args.recompute_granularity else ''}",
        flush=True,
    )
    if resume is not None:
        log(
            f"resuming from {resume[0]}: iteration {start_iteration}/{train_iters}, consumed "
            f"samples {start_iteration * global_batch} (re-running the command continues the "
            "run saved in --save)",
            flush=True,
        )
    start = time.perf_counter()
    before = run_eval("before training", start_iteration) if resume is None else None
    results = train(
        model,
        gpt_batches(
            train_ds, args.micro_batch_size, start_iteration * global_batch, dp_rank, dp_size
        ),
        cfg,
        num_layers,
        step_hook=hook,
        training=training,
        start_iteration=start_iteration,
        flops=ModelFlops.from_config(model.config, metadata.padded_vocab_size, args.seq_length),
        writer=writer,
        run_start=run_start,
        exit_handler=exit_handler,
    )
    if exit_handler is not None:
        exit_handler.restore()
    last_iteration = results[-1].iteration if results else start_iteration
    exited = bool(results) and results[-1].exit_requested
    after = None
    if not exited:
        after = run_eval("after training", last_iteration)
        if mod_config is not None and mod_config.routing == "topk" and results:
            decode_threshold = topk_decode_threshold(results)
            mod_config = dataclasses.replace(mod_config, topk_decode_threshold=decode_threshold)
            metadata = dataclasses.replace(metadata, mod=mod_config.to_dict())
            log(f"top-k decode threshold (mean smallest kept gate): {decode_threshold:.4f}")
            saved["iteration"] = None  # the final checkpoint must record the threshold
        if saved["iteration"] != last_iteration:
            save_checkpoint(last_iteration)
    if writer is not None:
        writer.close()
    iter_dir = save / f"iter_{last_iteration:07d}"
    summary = {
        "steps": len(results),
        "start_iteration": start_iteration,
        "last_iteration": last_iteration,
        "train_iters": train_iters,
        "exited_early": exited,
        "skipped_iterations": skipped,
        "seconds": round(time.perf_counter() - start, 1),
        "train_lm_loss_first": results[0].lm_loss if results else None,
        "train_lm_loss_last": results[-1].lm_loss if results else None,
        "valid_lm_loss_before": before.lm_loss if before else None,
        "valid_lm_loss_after": after.lm_loss if after else None,
        "c_eff_after": after.c_eff if after else None,
        "kept_fraction_after": after.kept_fraction if after else None,
        "checkpoint": str(iter_dir),
        "layout": {
            "tensor_model_parallel_size": tp,
            "pipeline_model_parallel_size": pp,
            "data_parallel_size": dp_size,
            "sequence_parallel": args.sequence_parallel,
            "use_distributed_optimizer": args.use_distributed_optimizer,
            "global_batch_size": global_batch,
            "num_microbatches": num_microbatches,
        },
        "step_metrics": [dataclasses.asdict(r) for r in results],
    }
    if exited:
        log(f"\nsaved {iter_dir}; re-run the same command to continue", flush=True)
    else:
        kept = format_kept_per_layer(after.kept_fraction)
        losses = (
            f"train lm loss {results[0].lm_loss:.3f} -> {results[-1].lm_loss:.3f} | "
            if results
            else ""
        )
        first = f"{before.lm_loss:.3f} -> " if before else ""
        log(
            f"\nsummary: {summary['steps']} steps in {summary['seconds']} s | {losses}"
            f"validation lm loss {first}{after.lm_loss:.3f} | c_eff {after.c_eff:.3f}"
            f"\nkept fraction per routed layer: {kept or 'none (dense)'}\nsaved {iter_dir}",
            flush=True,
        )
    if args.summary_json and rank == 0:
        Path(args.summary_json).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.summary_json, json.dumps(summary, indent=1))
    platform.destroy()
    return summary
