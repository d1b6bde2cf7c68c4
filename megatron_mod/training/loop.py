"""A compact megatron-core training loop for MoD models, on one process or under torchrun.

It drives megatron-core's pipeline schedule (``get_forward_backward_func``) over a model wrapped
in megatron-core DDP with the Megatron optimizer (:mod:`megatron_mod.training.optimizer`), so
the same loop runs data, tensor (with sequence) and pipeline parallel. The load-reducing loss is
attached with the right backward scale; LM loss, load loss, per-layer kept fraction F_j, mean
gate G_j and c_eff are logged to stdout and TensorBoard (rank 0), averaged over data-parallel
ranks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_mod.metrics import MoDMetricsTracker, get_metrics_tracker
from megatron_mod.router import set_load_loss_scale

__all__ = [
    "TrainConfig",
    "StepResult",
    "EvalResult",
    "train",
    "evaluate",
    "make_forward_step",
    "format_kept",
    "format_kept_per_layer",
]


@dataclass
class TrainConfig:
    """Optimisation and logging settings of :func:`train`."""

    train_iters: int = 40
    """Optimizer steps to run."""
    micro_batch_size: int = 4
    """Sequences per micro-batch."""
    num_microbatches: int = 1
    """Micro-batches accumulated per step (global batch = micro_batch_size * this * DP)."""
    seq_length: int = 128
    """Tokens per sequence."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr: float = 3e-4
    """Learning rate at the end of the cosine decay."""
    lr_warmup_iters: int = 5
    """Linear warmup steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    clip_grad: float = 1.0
    """Global gradient-norm clipping threshold (0 disables)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (megatron-core DistributedOptimizer)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduction with the backward pass (GPU runs)."""
    log_interval: int = 5
    """Print a log line every this many steps."""
    tensorboard_dir: str | None = None
    """Write TensorBoard scalars here when set."""

    def __post_init__(self):
        for name in ("train_iters", "micro_batch_size", "num_microbatches", "seq_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"TrainConfig needs 0 <= min_lr <= lr and lr > 0 ({self})")
        if self.log_interval < 1:
            raise ValueError("TrainConfig.log_interval must be >= 1")


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


def make_forward_step(micro_batch_size: int, seq_length: int):
    """The ``forward_step_func`` of megatron-core's schedule for ``{"tokens", "labels"}`` batches.

    Optional batch keys: ``loss_mask`` ([mbs, seq], 0 where a label must not count, e.g. after
    an end-of-document token with ``eod_mask_loss``) and ``position_ids``.
    """
    default_positions = torch.arange(seq_length).unsqueeze(0).expand(micro_batch_size, -1)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
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
    """Process groups that step metrics are summed over: pipeline stages and DP replicas."""
    return [
        parallel_state.get_pipeline_model_parallel_group(),
        parallel_state.get_data_parallel_group(),
    ]


def _mean_lm_loss(losses) -> float:
    """The micro-batch mean of the LM loss, on every rank: over pipeline stages and DP replicas."""
    lm_loss = torch.zeros(1)
    if parallel_state.is_pipeline_last_stage() and losses:
        lm_loss += sum(float(x["lm loss"]) for x in losses) / len(losses)
    # Only the last stage holds a loss, so the pipeline sum is that loss; DP replicas are averaged.
    for group in _metric_groups():
        torch.distributed.all_reduce(lm_loss, group=group)
    return float(lm_loss) / parallel_state.get_data_parallel_world_size()


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
    stats = tracker.summary(num_layers, groups=_metric_groups())
    tracker.clear()
    model.train(was_training)
    return EvalResult(
        lm_loss=_mean_lm_loss(losses),
        c_eff=MoDMetricsTracker.effective_capacity(stats, num_layers),
        kept_fraction={k: s.kept_fraction for k, s in stats.items()},
    )


def train(
    model: torch.nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    cfg: TrainConfig,
    num_layers: int,
    step_hook: Callable[[StepResult], None] | None = None,
) -> list[StepResult]:
    """Train ``model`` on ``batches`` of ``{"tokens", "labels"}`` ([mbs, seq] each).

    Call it on every rank of a torchrun launch (or in one process). The model is wrapped in
    megatron-core DDP and trained with the Megatron optimizer; its parameters are updated in
    place, so the caller saves ``model`` afterwards.

    Args:
        model: this rank's GPTModel (from :func:`megatron_mod.models.build_gpt_model`).
        batches: an endless iterator of this rank's micro-batches (its data-parallel share,
            e.g. from :func:`megatron_mod.training.pretrain.gpt_batches`).
        cfg: optimisation and logging settings.
        num_layers: total layers of the model (for c_eff and metrics across stages).
        step_hook: called after every step (periodic evaluation, checkpointing).

    Returns:
        One :class:`StepResult` per step (the same on every rank).
    """
    from megatron_mod.training.optimizer import current_lr, setup_model_and_optimizer

    ddp_model, optimizer, scheduler = setup_model_and_optimizer(model, cfg)
    writer = None
    if cfg.tensorboard_dir and torch.distributed.get_rank() == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(cfg.tensorboard_dir)

    tracker = get_metrics_tracker()
    forward_backward = get_forward_backward_func()
    forward_step = make_forward_step(cfg.micro_batch_size, cfg.seq_length)

    results = []
    ddp_model.train()
    start = time.perf_counter()
    for iteration in range(1, cfg.train_iters + 1):
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
        lr = current_lr(optimizer)
        updated, grad_norm, _ = optimizer.step()
        if not updated:
            raise RuntimeError(f"iteration {iteration}: the optimizer skipped its update")
        if grad_norm is None:
            grad_norm = optimizer.get_grad_norm()
        grad_norm = float(grad_norm)
        scheduler.step(increment=1)

        lm_loss = _mean_lm_loss(losses)
        stats = tracker.summary(num_layers, groups=_metric_groups())
        result = StepResult(
            iteration=iteration,
            lm_loss=lm_loss,
            load_loss=sum(s.load_loss for s in stats.values()),
            grad_norm=grad_norm,
            lr=lr,
            c_eff=MoDMetricsTracker.effective_capacity(stats, num_layers),
            kept_fraction={k: s.kept_fraction for k, s in stats.items()},
            kth_gate={k: s.kth_gate for k, s in stats.items() if s.kth_gate is not None},
        )
        results.append(result)
        if writer is not None:
            writer.add_scalar("lm loss", result.lm_loss, iteration)
            writer.add_scalar("mod/load loss", result.load_loss, iteration)
            writer.add_scalar("mod/c_eff", result.c_eff, iteration)
            writer.add_scalar("grad-norm", grad_norm, iteration)
            writer.add_scalar("learning-rate", lr, iteration)
            for layer, s in stats.items():
                tag = f"layer_{layer:02d}"
                writer.add_scalar(f"mod/kept_fraction/{tag}", s.kept_fraction, iteration)
                writer.add_scalar(f"mod/mean_gate/{tag}", s.mean_gate, iteration)
        if torch.distributed.get_rank() == 0 and (
            iteration % cfg.log_interval == 0 or iteration in (1, cfg.train_iters)
        ):
            elapsed = (time.perf_counter() - start) / iteration
            kept = format_kept(result.kept_fraction)
            print(
                f" iteration {iteration:5d}/{cfg.train_iters} | lm loss {result.lm_loss:.4f} | "
                f"load loss {result.load_loss:.5f} | grad norm {grad_norm:.3f} | lr {lr:.2e} | "
                f"c_eff {result.c_eff:.3f} | kept {kept} | {elapsed * 1000:.0f} ms/iter",
                flush=True,
            )
        if step_hook is not None:
            step_hook(result)
    tracker.clear()
    if writer is not None:
        writer.close()
    return results
