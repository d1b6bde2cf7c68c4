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
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from megatron_mod.training.arguments import (
    OVERRIDABLE_MOD_FIELDS,
    check_resume_args,
    num_microbatches,
    resolved_args,
    world_size,
)

__all__ = [
    "TrainingRun",
    "build_run",
    "finish_run",
    "gpt_batches",
    "pretrain",
    "run_training",
    "topk_decode_threshold",
]


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
        if any(getattr(args, f"mod_{f}") is not None for f in OVERRIDABLE_MOD_FIELDS):
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


@dataclasses.dataclass
class TrainingRun:
    """What :func:`build_run` sets up on this rank for the training and finishing steps."""

    args: argparse.Namespace
    """The parsed command line."""
    resolved: dict
    """The arguments with defaults resolved, as every checkpoint records them."""
    load: Path
    """The checkpoint the run started from (``--load``)."""
    save: Path
    """Where training checkpoints go (``--save``)."""
    resume: tuple | None
    """``(iteration dir, saved state)`` of the checkpoint being continued, or None."""
    metadata: object
    """The checkpoint metadata every save records (model config, layout, tokenizer)."""
    mod_config: object
    """The run's :class:`~megatron_mod.config.MoDConfig` (None: a dense model)."""
    model: torch.nn.Module
    """This rank's GPTModel."""
    cfg: object
    """The loop's :class:`~megatron_mod.training.loop.TrainConfig`."""
    training: tuple
    """``(ddp_model, optimizer, scheduler)``, with a resumed run's state loaded."""
    controller: object
    """The compute-target controller (``--mod-target-compute``), or None."""
    train_ds: object
    """The training dataset (every rank reads its own micro-batches)."""
    valid_ds: object
    """The validation dataset."""
    start_iteration: int
    """Iterations already done (a resumed run)."""
    skipped: int
    """Iterations skipped so far for a non-finite loss (``--on-nan skip``)."""
    global_batch: int
    """Sequences per optimizer step over all data-parallel ranks."""
    dp_rank: int
    """This rank's index in its data-parallel group."""
    dp_size: int
    """Data-parallel ranks."""
    writer: object
    """The TensorBoard writer (rank 0 with ``--tensorboard-dir``), or None."""
    exit_handler: object
    """The installed SIGTERM handler (``--exit-signal-handler``), or None."""
    run_start: float
    """``time.monotonic()`` when the command started (for ``--exit-duration-in-mins``)."""
    saved_iteration: int | None = None
    """The iteration the newest checkpoint in ``save`` holds."""

    @property
    def num_layers(self) -> int:
        return self.metadata.num_layers

    def log(self, *args, **kwargs) -> None:
        """Print on rank 0 only."""
        if torch.distributed.get_rank() == 0:
            print(*args, **kwargs)

    def evaluate(self, label: str, iteration: int):
        """Validation loss and routing on ``--eval-iters`` global batches; logged."""
        from megatron_mod.training.loop import evaluate, format_kept

        args = self.args
        result = evaluate(
            self.model,
            gpt_batches(self.valid_ds, args.micro_batch_size, 0, self.dp_rank, self.dp_size),
            args.eval_iters * self.cfg.num_microbatches,
            args.micro_batch_size,
            args.seq_length,
            self.num_layers,
        )
        kept = format_kept(result.kept_fraction)
        self.log(
            f" validation ({label}) | lm loss {result.lm_loss:.4f} | "
            f"c_eff {result.c_eff:.3f} | kept {kept}",
            flush=True,
        )
        if self.writer is not None:
            self.writer.add_scalar("validation/lm loss", result.lm_loss, iteration)
            ppl = math.exp(min(result.lm_loss, 30.0))
            self.writer.add_scalar("validation/ppl", ppl, iteration)
            self.writer.add_scalar("validation/c_eff", result.c_eff, iteration)
        return result

    def save_checkpoint(self, iteration: int) -> Path:
        """Write a training checkpoint of ``iteration`` into ``save`` (every rank)."""
        from megatron_mod.training import checkpoint as ckpt

        t0 = time.perf_counter()
        _, optimizer, scheduler = self.training
        if self.mod_config is not None:
            # The controller moves the thresholds: the saved config holds the current ones.
            self.metadata = dataclasses.replace(self.metadata, mod=self.mod_config.to_dict())
        iter_dir = ckpt.save_training_checkpoint(
            self.save,
            self.model,
            optimizer,
            scheduler,
            self.metadata,
            ckpt.TrainState(
                iteration=iteration,
                consumed_samples=iteration * self.global_batch,
                scheduler={},
                args=self.resolved,
                layout={},
                skipped_iterations=self.skipped,
                controller=self.controller.state_dict() if self.controller is not None else None,
            ),
            keep_last=self.args.keep_last,
            optimizer_format=(
                "fully_reshardable"
                if self.args.dist_ckpt_optim_fully_reshardable
                else "dp_reshardable"
            ),
        )
        self.saved_iteration = iteration
        self.log(
            f"saved checkpoint {iter_dir} (iteration {iteration}) in "
            f"{time.perf_counter() - t0:.1f} s",
            flush=True,
        )
        return iter_dir


def _check_layout(args: argparse.Namespace) -> None:
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if tp < 1 or pp < 1 or world_size() % (tp * pp):
        raise ValueError(
            f"{world_size()} ranks are not a multiple of tensor x pipeline parallel {tp} x {pp}"
        )
    if args.sequence_parallel and tp == 1:
        raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1")


def _find_resume(args: argparse.Namespace, resolved: dict, save: Path):
    """The checkpoint in ``save`` to continue, checked against this command (None: a new run)."""
    from megatron_mod.training import checkpoint as ckpt

    resume = None if args.overwrite else ckpt.find_training_checkpoint(save)
    if resume is not None:
        check_resume_args(resume[1].args, resolved, resume[0])
        tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
        ckpt.check_optimizer_compatible(
            resume[1],
            {
                "tensor_model_parallel_size": tp,
                "pipeline_model_parallel_size": pp,
                "data_parallel_size": world_size() // (tp * pp),
            },
            args.use_distributed_optimizer,
            resume[0],
        )
    return resume


def _model_overrides(args: argparse.Namespace) -> dict:
    """TransformerConfig settings the command line adds to the checkpoint's."""
    overrides = {"sequence_parallel": True} if args.sequence_parallel else {}
    if args.bf16:
        overrides["bf16"] = True
    if args.hidden_dropout or args.attention_dropout:
        overrides.update(
            hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout
        )
    if args.recompute_granularity:
        overrides.update(
            recompute_granularity=args.recompute_granularity,
            recompute_method=args.recompute_method,
            recompute_num_layers=args.recompute_num_layers,
        )
    return overrides


def _use_transformer_engine(args: argparse.Namespace) -> bool | None:
    use_te = None if args.transformer_impl is None else args.transformer_impl != "local"
    if use_te:
        from megatron_mod.specs import have_transformer_engine

        if not have_transformer_engine():
            raise ValueError(
                "--transformer-impl transformer_engine: Transformer Engine does not import here; "
                "install it or use --transformer-impl local"
            )
    return use_te


def _tokenizer_dir(args: argparse.Namespace, metadata, load: Path, save: Path, resume) -> str:
    if args.tokenizer_model:
        return args.tokenizer_model
    if metadata.tokenizer_dir:
        return str((save if resume is not None else load) / metadata.tokenizer_dir)
    raise ValueError(f"{load} records no tokenizer; pass --tokenizer-model DIR")


def _saved_metadata(args: argparse.Namespace, metadata, mod_config, load: Path, save: Path, resume):
    """The metadata every saved iteration records; a new run copies the tokenizer beside it."""
    if mod_config is not None:
        metadata = dataclasses.replace(metadata, mod=mod_config.to_dict())
    metadata = dataclasses.replace(
        metadata,
        params_dtype="bfloat16" if args.bf16 else "float32",
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
    )
    if resume is None:
        copy_tokenizer = None
        if save.resolve() != load.resolve() and metadata.tokenizer_dir:
            copy_tokenizer = (load / metadata.tokenizer_dir, save / metadata.tokenizer_dir)
        if args.tokenizer_model and not metadata.tokenizer_dir:
            copy_tokenizer = (Path(args.tokenizer_model), save / "tokenizer")
            metadata = dataclasses.replace(metadata, tokenizer_dir="tokenizer")
        if copy_tokenizer and torch.distributed.get_rank() == 0:
            shutil.copytree(*copy_tokenizer, dirs_exist_ok=True)
    return metadata


def build_run(args: argparse.Namespace) -> TrainingRun:
    """Check the command, set up the process groups, and build the model, data and optimizer.

    A resumed run is checked against the saved arguments before anything is built, and its
    optimizer, scheduler, RNG and controller state are loaded.
    """
    from megatron.core import parallel_state

    from megatron_mod import platform
    from megatron_mod.checkpointing import (
        build_model_from_metadata,
        load_model_checkpoint,
        read_checkpoint_metadata,
    )
    from megatron_mod.data.datasets import build_gpt_datasets, read_data_args_file
    from megatron_mod.data.megatron_tokenizer import megatron_tokenizer
    from megatron_mod.metrics import get_metrics_tracker
    from megatron_mod.training import checkpoint as ckpt
    from megatron_mod.training.loop import ExitSignalHandler, TrainConfig
    from megatron_mod.training.optimizer import setup_model_and_optimizer

    run_start = time.monotonic()
    # Installed first, so a SIGTERM while the model and data load is not lost either.
    exit_handler = ExitSignalHandler() if args.exit_signal_handler else None
    load, save = Path(args.load), Path(args.save)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    _check_layout(args)
    blend = args.data_path or read_data_args_file(args.data_args_path)
    resolved = resolved_args(args, blend, world_size() // (tp * pp))

    # Everything cheap first: a resumed run is checked before any model or data is built.
    resume = _find_resume(args, resolved, save)
    metadata = read_checkpoint_metadata(save if resume is not None else load)
    mod_config = _mod_overrides(args, metadata)
    if args.seq_length > metadata.max_seq_len:
        raise ValueError(
            f"--seq-length {args.seq_length} exceeds the checkpoint's max_seq_len "
            f"{metadata.max_seq_len} ({load})"
        )
    if args.mod_target_compute is not None and mod_config is None:
        raise ValueError("--mod-target-compute needs a MoD checkpoint (this one is dense)")
    platform.initialize(
        tp=tp, pp=pp, seed=args.seed, timeout_minutes=args.distributed_timeout_minutes
    )
    rank = torch.distributed.get_rank()
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    microbatches = num_microbatches(args, dp_size)
    global_batch = args.micro_batch_size * microbatches * dp_size
    if resume is None:
        _prepare_save_dir(save, load, args.overwrite)
    else:
        if rank == 0:
            stale = ckpt.clean_stale(save)
            if stale:
                print(f"removed what an interrupted save left in {save}: {', '.join(stale)}")
        torch.distributed.barrier()  # the iteration is in place before any rank reads it

    dense = mod_config is None
    use_te = _use_transformer_engine(args)
    if resume is None:
        model, metadata = load_model_checkpoint(
            load, mod_config=mod_config, dense=dense, use_transformer_engine=use_te,
            **_model_overrides(args),
        )  # fmt: skip
    else:
        model = build_model_from_metadata(
            metadata, mod_config, dense, use_transformer_engine=use_te, **_model_overrides(args)
        )
    tokenizer_dir = _tokenizer_dir(args, metadata, load, save, resume)

    train_iters = resolved["train_iters"]
    cfg = TrainConfig.from_args(
        args,
        train_iters=train_iters,
        num_microbatches=microbatches,
        lr_decay_iters=resolved["lr_decay_iters"],
    )
    evals = 1 + (train_iters // args.eval_interval if args.eval_interval else 0)
    train_ds, valid_ds, _ = build_gpt_datasets(
        blend,
        megatron_tokenizer(args.tokenizer_type, tokenizer_dir),
        seq_length=args.seq_length,
        num_samples=(train_iters * global_batch, evals * args.eval_iters * global_batch, 0),
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
    metadata = _saved_metadata(args, metadata, mod_config, load, save, resume)

    writer = None
    if args.tensorboard_dir and rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(args.tensorboard_dir)

    controller = None
    if args.mod_target_compute is not None:
        from megatron_mod.training.controller import ComputeTargetConfig, ComputeTargetController

        # The layers read their thresholds from this MoDConfig, which the controller updates.
        controller = ComputeTargetController(
            mod_config,
            metadata.num_layers,
            ComputeTargetConfig(
                target=args.mod_target_compute,
                warmup_steps=args.mod_target_warmup_steps,
                floor=args.mod_target_floor,
            ),
        )
    # The controller reads each routed layer's logit quantiles; nothing else needs them.
    get_metrics_tracker().record_logit_quantiles = controller is not None
    training = setup_model_and_optimizer(model, cfg)
    run = TrainingRun(
        args=args, resolved=resolved, load=load, save=save, resume=resume, metadata=metadata,
        mod_config=mod_config, model=model, cfg=cfg, training=training, controller=controller,
        train_ds=train_ds, valid_ds=valid_ds, start_iteration=0, skipped=0,
        global_batch=global_batch, dp_rank=dp_rank, dp_size=dp_size, writer=writer,
        exit_handler=exit_handler, run_start=run_start,
    )  # fmt: skip
    if resume is not None:
        _, optimizer, scheduler = training
        state = ckpt.load_training_checkpoint(resume[0], model, optimizer, scheduler)
        run.start_iteration, run.skipped = state.iteration, state.skipped_iterations
        run.saved_iteration = state.iteration
        if controller is not None and state.controller is not None:
            controller.load_state_dict(state.controller)
        if state.consumed_samples != state.iteration * global_batch:
            raise ValueError(
                f"{resume[0]}: consumed samples {state.consumed_samples} != iteration "
                f"{state.iteration} x global batch {global_batch}"
            )
    return run


def run_training(run: TrainingRun) -> tuple[list, object]:
    """Evaluate (a new run), then train to ``train_iters``, saving every ``--save-interval``.

    Returns:
        ``(step results, validation result before training or None when resumed)``.
    """
    from megatron_mod.training.loop import train
    from megatron_mod.training.throughput import ModelFlops

    args = run.args

    def hook(step):
        run.skipped += step.skipped
        if run.controller is not None and not step.skipped:
            # The statistics are reduced over all ranks, so every rank sets the same thresholds.
            run.controller.update(step.kept_fraction, step.logit_quantiles)
            run.controller.write_scalars(run.writer, step.iteration)
            if step.iteration % args.log_interval == 0 or step.iteration == cfg.train_iters:
                run.log(run.controller.log_line(), flush=True)
        if args.eval_interval and step.iteration % args.eval_interval == 0:
            run.evaluate(f"iteration {step.iteration}", step.iteration)
        if step.exit_requested or (args.save_interval and step.iteration % args.save_interval == 0):
            run.save_checkpoint(step.iteration)

    cfg, metadata = run.cfg, run.metadata
    run.log(
        f"loaded {run.save if run.resume else run.load}: {run.num_layers} layers, "
        f"hidden {metadata.dims().hidden_size}, "
        f"MoD {run.mod_config.to_dict() if run.mod_config else 'dense'}\n"
        f"layout: TP {args.tensor_model_parallel_size}, PP {args.pipeline_model_parallel_size}, "
        f"DP {run.dp_size}{', SP' if args.sequence_parallel else ''}"
        f"{', distributed optimizer' if args.use_distributed_optimizer else ''} | global batch "
        f"{run.global_batch} = {args.micro_batch_size} x {cfg.num_microbatches} micro-batches x "
        f"DP {run.dp_size} | {'bf16' if args.bf16 else 'fp32'}"
        f"{f' | recompute {args.recompute_granularity}' if args.recompute_granularity else ''}",
        flush=True,
    )
    if run.resume is not None:
        run.log(
            f"resuming from {run.resume[0]}: iteration {run.start_iteration}/{cfg.train_iters}, "
            f"consumed samples {run.start_iteration * run.global_batch} (re-running the command "
            "continues the run saved in --save)",
            flush=True,
        )
    before = run.evaluate("before training", 0) if run.resume is None else None
    start = run.start_iteration * run.global_batch
    results = train(
        run.model,
        gpt_batches(run.train_ds, args.micro_batch_size, start, run.dp_rank, run.dp_size),
        cfg,
        run.num_layers,
        step_hook=hook,
        training=run.training,
        start_iteration=run.start_iteration,
        flops=ModelFlops.from_config(run.model.config, metadata.padded_vocab_size, args.seq_length),
        writer=run.writer,
        run_start=run.run_start,
        exit_handler=run.exit_handler,
    )
    if run.exit_handler is not None:
        run.exit_handler.restore()
    return results, before


def finish_run(run: TrainingRun, results: list, before, seconds: float) -> dict:
    """Evaluate, record the top-k decode threshold, save the last step, and summarise.

    A run that stopped early (time limit, SIGTERM) has saved already and is not evaluated.

    Returns:
        The run summary (also written to ``--summary-json`` by rank 0).
    """
    from megatron_mod.atomic import write_text_atomic
    from megatron_mod.training.loop import format_kept_per_layer

    args = run.args
    last_iteration = results[-1].iteration if results else run.start_iteration
    exited = bool(results) and results[-1].exit_requested
    after = None
    if not exited:
        after = run.evaluate("after training", last_iteration)
        if run.mod_config is not None and run.mod_config.routing == "topk" and results:
            decode_threshold = topk_decode_threshold(results)
            run.mod_config = dataclasses.replace(
                run.mod_config, topk_decode_threshold=decode_threshold
            )
            run.metadata = dataclasses.replace(run.metadata, mod=run.mod_config.to_dict())
            run.log(f"top-k decode threshold (mean smallest kept gate): {decode_threshold:.4f}")
            run.saved_iteration = None  # the final checkpoint must record the threshold
        if run.saved_iteration != last_iteration:
            run.save_checkpoint(last_iteration)
    if run.writer is not None:
        run.writer.close()
    iter_dir = run.save / f"iter_{last_iteration:07d}"
    summary = {
        "steps": len(results),
        "start_iteration": run.start_iteration,
        "last_iteration": last_iteration,
        "train_iters": run.cfg.train_iters,
        "exited_early": exited,
        "skipped_iterations": run.skipped,
        "seconds": round(seconds, 1),
        "train_lm_loss_first": results[0].lm_loss if results else None,
        "train_lm_loss_last": results[-1].lm_loss if results else None,
        "valid_lm_loss_before": before.lm_loss if before else None,
        "valid_lm_loss_after": after.lm_loss if after else None,
        "c_eff_after": after.c_eff if after else None,
        "kept_fraction_after": after.kept_fraction if after else None,
        "checkpoint": str(iter_dir),
        "layout": {
            "tensor_model_parallel_size": args.tensor_model_parallel_size,
            "pipeline_model_parallel_size": args.pipeline_model_parallel_size,
            "data_parallel_size": run.dp_size,
            "sequence_parallel": args.sequence_parallel,
            "use_distributed_optimizer": args.use_distributed_optimizer,
            "global_batch_size": run.global_batch,
            "num_microbatches": run.cfg.num_microbatches,
        },
        # Every step's metrics but the logit quantiles (257 numbers per layer and step).
        "step_metrics": [
            {k: v for k, v in dataclasses.asdict(r).items() if k != "logit_quantiles"}
            for r in results
        ],
    }
    if exited:
        run.log(f"\nsaved {iter_dir}; re-run the same command to continue", flush=True)
    else:
        kept = format_kept_per_layer(after.kept_fraction)
        losses = (
            f"train lm loss {results[0].lm_loss:.3f} -> {results[-1].lm_loss:.3f} | "
            if results
            else ""
        )
        first = f"{before.lm_loss:.3f} -> " if before else ""
        run.log(
            f"\nsummary: {summary['steps']} steps in {summary['seconds']} s | {losses}"
            f"validation lm loss {first}{after.lm_loss:.3f} | c_eff {after.c_eff:.3f}"
            f"\nkept fraction per routed layer: {kept or 'none (dense)'}\nsaved {iter_dir}",
            flush=True,
        )
    if args.summary_json and torch.distributed.get_rank() == 0:
        Path(args.summary_json).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.summary_json, json.dumps(summary, indent=1))
    return summary


def pretrain(args: argparse.Namespace) -> dict:
    """Load (or resume), train, evaluate and save; returns a summary dict (printed by rank 0).

    Call it on every rank of a torchrun launch (or in one process).
    """
    from megatron_mod import platform

    run = build_run(args)
    start = time.perf_counter()
    results, before = run_training(run)
    summary = finish_run(run, results, before, time.perf_counter() - start)
    platform.destroy()
    return summary
