"""The trainer's command line: flags, their checks, and what a resumed run must share.

``parse_args`` follows Megatron-LM's ``pretrain_gpt.py`` flag names where they exist; the
``--mod-*`` overrides come from :class:`megatron_mod.config.MoDConfig`'s fields.
``resolved_args`` is the run's arguments with defaults filled in, as a checkpoint records them,
and ``check_resume_args`` refuses to continue a run whose meaning-changing arguments differ.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

__all__ = [
    "MEANING_CHANGING_ARGS",
    "OVERRIDABLE_MOD_FIELDS",
    "check_resume_args",
    "num_microbatches",
    "parse_args",
    "resolved_args",
    "world_size",
]

# MoDConfig fields a run may change without changing the checkpoint's parameters.
OVERRIDABLE_MOD_FIELDS = (
    "routing",
    "threshold",
    "capacity",
    "gate",
    "load_loss_coeff",
    "compact_length_multiple",
    "keep_first_token",
    "skipped_kv",
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
    "hidden_dropout",
    "attention_dropout",
    *(f"mod_{f}" for f in OVERRIDABLE_MOD_FIELDS),
    "mod_target_compute",
    "mod_target_warmup_steps",
    "mod_target_floor",
    "mod_router_lr_mult",
    "mod_router_weight_decay",
    "mod_train_routers_only",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (``pretrain_gpt.py`` names where they exist)."""
    from megatron_mod.config import MoDConfig

    p = argparse.ArgumentParser(
        description="Continued pretraining of a converted checkpoint on an indexed-dataset blend.",
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
        "--distributed-timeout-minutes",
        type=float,
        default=30.0,
        help="timeout of collectives; rank 0 alone builds a new blend's sample index while the "
        "others wait at a barrier (default: 30)",
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
    g = p.add_argument_group("regularisation")
    g.add_argument(
        "--hidden-dropout",
        type=float,
        default=0.0,
        help="dropout on each layer's attention and MLP outputs (LLaMA: 0; a resume restores "
        "the RNG streams it draws from)",
    )
    g.add_argument(
        "--attention-dropout",
        type=float,
        default=0.0,
        help="dropout on the attention probabilities (LLaMA: 0)",
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
        fields=OVERRIDABLE_MOD_FIELDS,
        with_defaults=False,
        title="MoD overrides (default: the checkpoint's settings)",
    )
    g = p.add_argument_group("MoD training controls")
    g.add_argument(
        "--mod-target-compute",
        type=float,
        help="ask for this c_eff (computed fraction over all layers): every routed layer's "
        "threshold is steered to the quantile of its own logits that keeps a scheduled fraction, "
        "ramped from what it keeps at the start (megatron_mod.training.controller)",
    )
    g.add_argument(
        "--mod-router-lr-mult",
        type=float,
        default=1.0,
        help="the routers' learning rates (peak and final) are this multiple of --lr/--min-lr",
    )
    g.add_argument(
        "--mod-router-weight-decay",
        action="store_true",
        help="apply --weight-decay to the router weights too (default: routers are exempt, "
        "as megatron exempts norms and biases)",
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
        help="steps over which each routed layer's kept fraction ramps from its start to its "
        "target (never faster than 0.05 per step)",
    )
    g.add_argument(
        "--mod-target-floor",
        type=float,
        default=0.1,
        help="no routed layer is steered below this kept fraction",
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
    for name in ("hidden_dropout", "attention_dropout"):
        if not 0.0 <= getattr(args, name) < 1.0:
            parser.error(f"--{name.replace('_', '-')} must be in [0, 1)")
    if args.distributed_timeout_minutes <= 0:
        parser.error("--distributed-timeout-minutes must be > 0")
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


def world_size() -> int:
    """Ranks of this launch (torchrun's WORLD_SIZE; 1 for a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def num_microbatches(args: argparse.Namespace, data_parallel_size: int) -> int:
    """Micro-batches per optimizer step on each data-parallel rank.

    Raises:
        ValueError: ``--global-batch-size`` is not a multiple of micro-batch size x DP.
    """
    per_pass = args.micro_batch_size * data_parallel_size
    global_batch = args.global_batch_size or per_pass
    if global_batch % per_pass:
        raise ValueError(
            f"--global-batch-size {global_batch} is not a multiple of --micro-batch-size "
            f"{args.micro_batch_size} x data-parallel size {data_parallel_size} = {per_pass}"
        )
    return global_batch // per_pass


def resolved_args(args: argparse.Namespace, blend: list[str], data_parallel_size: int) -> dict:
    """The run's arguments with defaults resolved (what a resume is checked against)."""
    global_batch = num_microbatches(args, data_parallel_size) * args.micro_batch_size
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
