"""A compact megatron-core training loop for MoD models, on one process or under torchrun.

It drives megatron-core's pipeline schedule (``get_forward_backward_func``) over a model wrapped
in megatron-core DDP with the Megatron optimizer (:mod:`megatron_mod.training.optimizer`), so
the same loop runs data, tensor (with sequence) and pipeline parallel. The load-reducing loss is
attached with the right backward scale; LM loss, load loss, per-layer kept fraction F_j, mean
gate G_j, c_eff and throughput are logged to stdout and TensorBoard (rank 0), averaged over
data-parallel ranks.

Everything the loop creates lives on the compute device (:func:`megatron_mod.platform.device`):
batches are moved there before the model sees them, and each step's LM loss and exit flags are
reduced in one collective on a device buffer, read back to the host once per step (the skip /
stop decision and the log line need the value).
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_mod import platform
from megatron_mod.metrics import MoDMetricsTracker, get_metrics_tracker
from megatron_mod.router import set_load_loss_scale

__all__ = [
    "TrainConfig",
    "StepResult",
    "EvalResult",
    "NonFiniteError",
    "ExitSignalHandler",
    "train",
    "evaluate",
    "make_forward_step",
    "to_device",
    "format_kept",
    "format_kept_per_layer",
]

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")
ON_NAN_CHOICES = ("skip", "stop")


# TrainConfig fields whose trainer flag has another name.
_FLAGS_OF_FIELDS = {
    "router_lr_mult": "mod_router_lr_mult",
    "train_routers_only": "mod_train_routers_only",
    "router_weight_decay": "mod_router_weight_decay",
}


@dataclass
class TrainConfig:
    """Optimisation and logging settings of :func:`train`."""

    train_iters: int = 40
    """Optimizer steps to run (the last iteration number)."""
    micro_batch_size: int = 4
    """Sequences per micro-batch."""
    num_microbatches: int = 1
    """Micro-batches accumulated per step (global batch = micro_batch_size * this * DP)."""
    seq_length: int = 128
    """Tokens per sequence."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr: float = 3e-4
    """Learning rate at the end of the decay."""
    lr_warmup_iters: int = 5
    """Linear warmup steps."""
    lr_decay_iters: int | None = None
    """Steps over which the learning rate decays to ``min_lr`` (default: ``train_iters``)."""
    lr_decay_style: str = "cosine"
    """Decay after warmup: ``constant``, ``linear``, ``cosine`` or ``inverse-square-root``."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    clip_grad: float = 1.0
    """Global gradient-norm clipping threshold (0 disables)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (megatron-core DistributedOptimizer)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduction with the backward pass (GPU runs)."""
    router_lr_mult: float = 1.0
    """The routers' peak and final learning rates are this multiple of ``lr`` / ``min_lr``."""
    train_routers_only: bool = False
    """Freeze everything but the routers (the Router-Tuning baseline)."""
    router_weight_decay: bool = False
    """Apply ``weight_decay`` to router weights too (default: exempt, like norms and biases)."""
    on_nan: str = "stop"
    """A non-finite LM loss or gradient norm: ``skip`` the update or ``stop`` with an error."""
    exit_signal_handler: bool = False
    """On SIGTERM, finish the current step, let the step hook save, and return."""
    exit_duration_in_mins: float | None = None
    """Return (after the step hook saved) once the run has lasted this many minutes."""
    log_interval: int = 5
    """Print a log line every this many steps."""
    tensorboard_dir: str | None = None
    """Write TensorBoard scalars here when set."""

    @classmethod
    def from_args(cls, args, **derived) -> TrainConfig:
        """The settings of a trainer command line (``training.arguments.parse_args``).

        Each field is read from the flag of the same name (``router_lr_mult`` and
        ``train_routers_only`` from their ``--mod-`` flags), unless ``derived`` gives it: the
        values a run works out from several flags (``train_iters``, ``num_microbatches``,
        ``lr_decay_iters``).

        Raises:
            ValueError: a field has neither a flag nor a derived value, or ``derived`` names a
                field that does not exist.
        """
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(derived) - set(names))
        if unknown:
            raise ValueError(f"TrainConfig has no field(s) {unknown}")
        values, missing = {}, []
        for name in names:
            flag = _FLAGS_OF_FIELDS.get(name, name)
            if name in derived:
                values[name] = derived[name]
            elif hasattr(args, flag):
                values[name] = getattr(args, flag)
            else:
                missing.append(name)
        if missing:
            raise ValueError(f"TrainConfig.from_args: no flag or derived value for {missing}")
        return cls(**values)

    def __post_init__(self):
        for name in ("train_iters", "micro_batch_size", "num_microbatches", "seq_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"TrainConfig needs 0 <= min_lr <= lr and lr > 0 ({self})")
        if self.lr_warmup_iters < 0:
            raise ValueError("TrainConfig.lr_warmup_iters must be >= 0")
        if self.lr_decay_iters is not None and self.lr_decay_iters < 1:
            raise ValueError("TrainConfig.lr_decay_iters must be >= 1")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise ValueError(
                f"TrainConfig.lr_decay_style {self.lr_decay_style!r}: use one of {LR_DECAY_STYLES}"
            )
        if self.router_lr_mult <= 0:
            raise ValueError(f"TrainConfig.router_lr_mult must be > 0, got {self.router_lr_mult}")
        if self.on_nan not in ON_NAN_CHOICES:
            raise ValueError(f"TrainConfig.on_nan {self.on_nan!r}: use one of {ON_NAN_CHOICES}")
        if self.exit_duration_in_mins is not None and self.exit_duration_in_mins <= 0:
            raise ValueError("TrainConfig.exit_duration_in_mins must be > 0")
        if self.log_interval < 1:
            raise ValueError("TrainConfig.log_interval must be >= 1")

    @property
    def decay_iters(self) -> int:
        """The iterations the LR schedule decays over."""
        return self.lr_decay_iters or self.train_iters


@dataclass
class StepResult:
    """What one optimizer step measured."""

    iteration: int
    lm_loss: float
    load_loss: float
    grad_norm: float
    lr: float
    c_eff: float
    kept_fraction: dict[int, float]
    kth_gate: dict[int, float] = field(default_factory=dict)
    """Top-k routing: per layer, the mean smallest kept gate (see ``RoutingDecision.kth_gate``)."""
    logit_quantiles: dict[int, list[float]] = field(default_factory=dict, repr=False)
    """Per routed layer: its logits' quantiles (``router.QUANTILE_GRID`` points; not logged)."""
    skipped: bool = False
    """The update was skipped (non-finite loss or gradient norm with ``on_nan="skip"``)."""
    step_time: float = 0.0
    """Seconds this step took (forward, backward, reduction and optimizer update)."""
    tokens_per_s: float = 0.0
    """Tokens of the global batch per second of step time."""
    computed_tokens_per_s: float = 0.0
    """``tokens_per_s x c_eff``: (token, layer) pairs actually computed, in token units."""
    mfu: float | None = None
    """Model FLOPs utilisation (GPU runs with a known peak), counting computed pairs only."""
    exit_requested: bool = False
    """SIGTERM or ``exit_duration_in_mins`` was seen (on any rank): the run stops after it."""


class NonFiniteError(RuntimeError):
    """A non-finite LM loss or gradient norm with ``on_nan="stop"``."""


class ExitSignalHandler:
    """Records SIGTERM (SLURM's pre-emption warning) instead of dying at once.

    The loop reads :attr:`received` at its per-step reduction, so every rank agrees on the
    step after which it saves and stops. The previous handler is restored by :meth:`restore`.
    """

    def __init__(self, signum: int = signal.SIGTERM):
        self.signum = signum
        self.received = False
        self._previous = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = True

    def restore(self) -> None:
        """Put the previous handler back."""
        signal.signal(self.signum, self._previous)


def to_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` with every tensor on the compute device (asynchronous copies on GPU)."""
    dev = platform.device()
    return {key: value.to(dev, non_blocking=True) for key, value in batch.items()}


def make_forward_step(micro_batch_size: int, seq_length: int):
    """The ``forward_step_func`` of megatron-core's schedule for ``{"tokens", "labels"}`` batches.

    Optional batch keys: ``loss_mask`` ([mbs, seq], 0 where a label must not count, e.g. after
    an end-of-document token with ``eod_mask_loss``) and ``position_ids``. Batches are moved to
    the compute device here (a no-op for ones already there).
    """
    default_positions = (
        torch.arange(seq_length, device=platform.device()).unsqueeze(0).expand(micro_batch_size, -1)
    )

    def forward_step(data_iterator, model):
        batch = to_device(next(data_iterator))
        positions = batch.get("position_ids", default_positions)
        output = model(batch["tokens"], positions, None, labels=batch["labels"])
        loss_mask = batch.get("loss_mask")

        def loss_func(per_token_loss):
            per_token_loss = per_token_loss.float()
            if loss_mask is None:
                loss = per_token_loss.mean()
            else:
                mask = loss_mask.to(per_token_loss.dtype)
                loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
            return loss, {"lm loss": loss.detach().clone()}

        return output, loss_func

    return forward_step


def _metric_groups() -> list:
    """The group step metrics are summed over: all ranks.

    A value lives on the pipeline stage that computes it and is identical on that stage's
    tensor-parallel ranks, so a sum over every rank is ``TP x`` the sum over stages and
    data-parallel replicas: averages (sum / count, both scaled alike) are unchanged, and one
    collective replaces one per group.
    """
    return [torch.distributed.group.WORLD]


def _reduce_step(losses, flags: tuple[bool, ...] = ()) -> tuple[float, list[bool]]:
    """The micro-batch mean LM loss over DP replicas and any-rank flags, in one collective.

    Args:
        losses: the schedule's per-micro-batch loss dicts (empty except on the last stage).
        flags: per-rank booleans (exit requests); the result says whether any rank set each.

    Returns:
        ``(lm_loss, flags_on_any_rank)``, the same on every rank.
    """
    buf = torch.zeros(1 + len(flags), device=platform.device())
    if parallel_state.is_pipeline_last_stage() and losses:
        buf[0] = torch.stack([x["lm loss"] for x in losses]).mean()
    for i, flag in enumerate(flags):
        if flag:
            buf[1 + i] = 1.0
    if torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(buf)
    # Only last-stage ranks hold a loss, identical over their TP ranks: divide by TP x DP.
    replicas = (
        parallel_state.get_tensor_model_parallel_world_size()
        * parallel_state.get_data_parallel_world_size()
    )
    values = buf.tolist()  # the step's one host sync for these values
    return values[0] / replicas, [v > 0 for v in values[1:]]


def format_kept(kept_fraction: dict[int, float]) -> str:
    """Per-layer kept fractions for a log line: ``1:0.33 3:0.08``."""
    return " ".join(f"{k}:{v:.2f}" for k, v in sorted(kept_fraction.items()))


def format_kept_per_layer(kept_fraction: dict[int, float]) -> str:
    """Per-layer kept fractions for a summary: ``layer 1: 0.33, layer 3: 0.08``."""
    return ", ".join(f"layer {k}: {v:.2f}" for k, v in sorted(kept_fraction.items()))


@dataclass
class EvalResult:
    """Validation LM loss and routing statistics over ``iters`` micro-batches."""

    lm_loss: float
    c_eff: float
    kept_fraction: dict[int, float]
    mean_gate: dict[int, float] = field(default_factory=dict)
    """Per routed layer: the mean router gate G_j."""


def evaluate(
    model: torch.nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    iters: int,
    micro_batch_size: int,
    seq_length: int,
    num_layers: int,
) -> EvalResult:
    """Forward-only pass over ``iters`` micro-batches: mean LM loss, kept fractions and c_eff.

    Args:
        model: this rank's GPTModel.
        batches: validation micro-batches (``{"tokens", "labels"}`` and optional ``loss_mask``).
        iters: micro-batches to evaluate.
        micro_batch_size: sequences per micro-batch.
        seq_length: tokens per sequence.
        num_layers: total layers of the model (for c_eff).
    """
    tracker = get_metrics_tracker()
    tracker.clear()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        losses = get_forward_backward_func()(
            forward_step_func=make_forward_step(micro_batch_size, seq_length),
            data_iterator=batches,
            model=model,
            num_microbatches=iters,
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=True,
        )
    lm_loss, _ = _reduce_step(losses)
    stats = tracker.summary(num_layers, groups=_metric_groups(), device=platform.device())
    tracker.clear()
    model.train(was_training)
    return EvalResult(
        lm_loss=lm_loss,
        c_eff=MoDMetricsTracker.effective_capacity(stats, num_layers),
        kept_fraction={k: s.kept_fraction for k, s in stats.items()},
        mean_gate={k: s.mean_gate for k, s in stats.items()},
    )


def _open_writer(cfg: TrainConfig):
    if not cfg.tensorboard_dir or torch.distributed.get_rank() != 0:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(cfg.tensorboard_dir)


def _write_scalars(writer, result: StepResult, stats: dict, consumed_samples: int) -> None:
    it = result.iteration
    scalars = {
        "lm loss": result.lm_loss,
        "mod/load loss": result.load_loss,
        "mod/c_eff": result.c_eff,
        "grad-norm": result.grad_norm,
        "learning-rate": result.lr,
        "skipped": float(result.skipped),
        "consumed-samples": float(consumed_samples),
        "throughput/step time (s)": result.step_time,
        "throughput/tokens per s": result.tokens_per_s,
        "throughput/computed tokens per s": result.computed_tokens_per_s,
    }
    if result.mfu is not None:
        scalars["throughput/mfu"] = result.mfu
    for name, value in scalars.items():
        writer.add_scalar(name, value, it)
    for layer, s in stats.items():
        tag = f"layer_{layer:02d}"
        writer.add_scalar(f"mod/kept_fraction/{tag}", s.kept_fraction, it)
        writer.add_scalar(f"mod/mean_gate/{tag}", s.mean_gate, it)
        writer.add_scalar(f"mod/load_loss/{tag}", s.load_loss, it)
        if s.kth_gate is not None:
            writer.add_scalar(f"mod/kth_gate/{tag}", s.kth_gate, it)


def train(
    model: torch.nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    cfg: TrainConfig,
    num_layers: int,
    step_hook: Callable[[StepResult], None] | None = None,
    *,
    training: tuple | None = None,
    start_iteration: int = 0,
    flops=None,
    writer=None,
    run_start: float | None = None,
    exit_handler: ExitSignalHandler | None = None,
) -> list[StepResult]:
    """Train ``model`` on ``batches`` of ``{"tokens", "labels"}`` ([mbs, seq] each).

    Call it on every rank of a torchrun launch (or in one process). The model is wrapped in
    megatron-core DDP and trained with the Megatron optimizer; its parameters are updated in
    place, so the caller saves ``model`` afterwards.

    Args:
        model: this rank's GPTModel (from :func:`megatron_mod.models.build_gpt_model`).
        batches: an endless iterator of this rank's micro-batches (its data-parallel share,
            e.g. from :func:`megatron_mod.training.pretrain.gpt_batches`), positioned at
            ``start_iteration``'s data.
        cfg: optimisation and logging settings.
        num_layers: total layers of the model (for c_eff and metrics across stages).
        step_hook: called after every step (periodic evaluation, checkpointing); a step with
            ``exit_requested`` is the last one, so the hook saves then.
        training: ``(ddp_model, optimizer, scheduler)`` from
            :func:`~megatron_mod.training.optimizer.setup_model_and_optimizer`, e.g. with a
            checkpoint's state loaded (default: built here).
        start_iteration: iterations already done (resuming): the loop runs the rest.
        flops: a :class:`~megatron_mod.training.throughput.ModelFlops` for MFU (GPU only).
        writer: a TensorBoard ``SummaryWriter`` (rank 0); default: one on
            ``cfg.tensorboard_dir``.
        run_start: ``time.monotonic()`` at the start of the run, for ``exit_duration_in_mins``.
        exit_handler: an installed :class:`ExitSignalHandler` (the caller restores it); default
            with ``cfg.exit_signal_handler``: one installed for the loop's duration.

    Returns:
        One :class:`StepResult` per step run (the same on every rank).

    Raises:
        NonFiniteError: a non-finite LM loss or gradient norm with ``cfg.on_nan == "stop"``
            (on every rank at the same step).
    """
    from megatron_mod.training.optimizer import (
        clip_and_step,
        current_lr,
        setup_model_and_optimizer,
    )

    ddp_model, optimizer, scheduler = training or setup_model_and_optimizer(model, cfg)
    own_writer = writer is None
    if own_writer:
        writer = _open_writer(cfg)
    run_start = time.monotonic() if run_start is None else run_start
    own_handler = exit_handler is None and cfg.exit_signal_handler
    handler = ExitSignalHandler() if own_handler else exit_handler

    tracker = get_metrics_tracker()
    forward_backward = get_forward_backward_func()
    forward_step = make_forward_step(cfg.micro_batch_size, cfg.seq_length)
    dp_size = parallel_state.get_data_parallel_world_size()
    global_batch = cfg.micro_batch_size * cfg.num_microbatches * dp_size
    tokens_per_step = global_batch * cfg.seq_length
    peak = flops.peak_flops_per_device() if flops is not None else None
    world = torch.distributed.get_world_size()

    results = []
    ddp_model.train()
    log_window: list[float] = []
    try:
        for iteration in range(start_iteration + 1, cfg.train_iters + 1):
            step_start = time.perf_counter()
            ddp_model.zero_grad_buffer()
            optimizer.zero_grad()
            tracker.clear()
            set_load_loss_scale(cfg.num_microbatches)
            losses = forward_backward(
                forward_step_func=forward_step,
                data_iterator=batches,
                model=[ddp_model],
                num_microbatches=cfg.num_microbatches,
                seq_length=cfg.seq_length,
                micro_batch_size=cfg.micro_batch_size,
                forward_only=False,
            )
            duration_over = (
                cfg.exit_duration_in_mins is not None
                and time.monotonic() - run_start > cfg.exit_duration_in_mins * 60
            )
            signalled = handler is not None and handler.received
            lm_loss, (signalled, duration_over) = _reduce_step(losses, (signalled, duration_over))
            lr = current_lr(optimizer)
            found_inf = optimizer.prepare_grads()
            grad_norm = float(optimizer.get_grad_norm())
            # Both values are reduced (over DP/PP, and the norm over model-parallel ranks), so
            # every rank takes the same branch at the same step.
            finite = math.isfinite(lm_loss) and math.isfinite(grad_norm) and not found_inf
            if not finite and cfg.on_nan == "stop":
                what = "grad norm" if math.isfinite(lm_loss) else "lm loss"
                raise NonFiniteError(
                    f"iteration {iteration}: non-finite {what} "
                    f"(lm loss {lm_loss}, grad norm {grad_norm}); stopping (--on-nan stop). "
                    "The last saved checkpoint is unaffected; --on-nan skip skips such updates."
                )
            if finite:
                clip_and_step(optimizer, grad_norm)
                scheduler.step(increment=1)
            stats = tracker.summary(num_layers, groups=_metric_groups(), device=platform.device())
            step_time = time.perf_counter() - step_start
            c_eff = MoDMetricsTracker.effective_capacity(stats, num_layers)
            mfu = None
            if peak:
                mfu = flops.training_flops_per_token(c_eff) * tokens_per_step / step_time
                mfu /= peak * world
            result = StepResult(
                iteration=iteration,
                lm_loss=lm_loss,
                load_loss=sum(s.load_loss for s in stats.values()),
                grad_norm=grad_norm,
                lr=lr,
                c_eff=c_eff,
                kept_fraction={k: s.kept_fraction for k, s in stats.items()},
                kth_gate={k: s.kth_gate for k, s in stats.items() if s.kth_gate is not None},
                logit_quantiles={
                    k: s.logit_quantiles for k, s in stats.items() if s.logit_quantiles is not None
                },
                skipped=not finite,
                step_time=step_time,
                tokens_per_s=tokens_per_step / step_time,
                computed_tokens_per_s=tokens_per_step * c_eff / step_time,
                mfu=mfu,
                exit_requested=signalled or duration_over,
            )
            results.append(result)
            log_window.append(step_time)
            if writer is not None:
                _write_scalars(writer, result, stats, iteration * global_batch)
            last = iteration == cfg.train_iters or result.exit_requested
            if torch.distributed.get_rank() == 0 and (
                iteration % cfg.log_interval == 0 or iteration == start_iteration + 1 or last
            ):
                print(_log_line(result, cfg.train_iters, log_window), flush=True)
                log_window = []
            if step_hook is not None:
                step_hook(result)
            if result.exit_requested:
                reason = "SIGTERM" if signalled else "--exit-duration-in-mins"
                if torch.distributed.get_rank() == 0:
                    print(f"exiting after iteration {iteration} ({reason})", flush=True)
                break
    finally:
        tracker.clear()
        if own_handler:
            handler.restore()
        if own_writer and writer is not None:
            writer.close()
    return results


def _log_line(result: StepResult, train_iters: int, window: list[float]) -> str:
    """`` iteration N/M | lm loss … | kept … | X ms/iter | …``: the shape tools parse."""
    step_time = sum(window) / len(window)
    tokens_per_s = result.tokens_per_s * result.step_time / step_time
    line = (
        f" iteration {result.iteration:5d}/{train_iters} | lm loss {result.lm_loss:.4f} | "
        f"load loss {result.load_loss:.5f} | grad norm {result.grad_norm:.3f} | "
        f"lr {result.lr:.2e} | c_eff {result.c_eff:.3f} | kept {format_kept(result.kept_fraction)}"
        f" | {step_time * 1000:.0f} ms/iter | tokens/s {tokens_per_s:.0f} | "
        f"computed tokens/s {tokens_per_s * result.c_eff:.0f}"
    )
    if result.mfu is not None:
        line += f" | MFU {result.mfu * 100:.1f}%"
    if result.skipped:
        line += " | skipped (non-finite)"
    return line
