"""A compact single-process megatron-core training loop for MoD models.

It drives megatron-core's pipeline schedule (``get_forward_backward_func``), attaches the
load-reducing loss with the right backward scale, and logs LM loss, load loss, per-layer kept
fraction F_j, mean gate G_j and c_eff to stdout and TensorBoard. It uses torch's AdamW, so it is
limited to one process (megatron-core's optimizer wrappers and DDP, needed for TP/PP/DP
gradient reduction, assume CUDA tensors); multi-rank parity of the MoD layers themselves is
covered by the distributed tests.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_mod.metrics import MoDMetricsTracker, get_metrics_tracker
from megatron_mod.router import set_load_loss_scale

__all__ = ["TrainConfig", "StepResult", "EvalResult", "train", "evaluate", "make_forward_step"]


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


def _lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < cfg.lr_warmup_iters:
            return (step + 1) / cfg.lr_warmup_iters
        span = max(1, cfg.train_iters - cfg.lr_warmup_iters)
        progress = min(1.0, (step - cfg.lr_warmup_iters) / span)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return (cfg.min_lr + (cfg.lr - cfg.min_lr) * cosine) / cfg.lr

    return factor


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


def _mean_lm_loss(losses) -> float:
    """The micro-batch mean of the LM loss, reduced to every pipeline stage."""
    lm_loss = torch.zeros(1)
    if parallel_state.is_pipeline_last_stage() and losses:
        lm_loss += sum(float(x["lm loss"]) for x in losses) / len(losses)
    torch.distributed.all_reduce(lm_loss, group=parallel_state.get_pipeline_model_parallel_group())
    return float(lm_loss)


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
    stats = tracker.summary(num_layers, groups=[parallel_state.get_pipeline_model_parallel_group()])
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

    Args:
        model: this rank's GPTModel (from :func:`megatron_mod.models.build_gpt_model`).
        batches: an endless iterator of micro-batches.
        cfg: optimisation and logging settings.
        num_layers: total layers of the model (for c_eff and metrics across stages).
        step_hook: called after every step (periodic evaluation, checkpointing).

    Returns:
        One :class:`StepResult` per step (the same on every rank).
    """
    if torch.distributed.get_world_size() != 1:
        raise RuntimeError(
            "megatron_mod.training.loop.train runs in one process; launch it without torchrun"
        )
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        betas=(0.9, 0.95),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    writer = None
    if cfg.tensorboard_dir and torch.distributed.get_rank() == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(cfg.tensorboard_dir)

    tracker = get_metrics_tracker()
    forward_backward = get_forward_backward_func()
    forward_step = make_forward_step(cfg.micro_batch_size, cfg.seq_length)

    results = []
    model.train()
    start = time.perf_counter()
    for iteration in range(1, cfg.train_iters + 1):
        optimizer.zero_grad(set_to_none=True)
        tracker.clear()
        set_load_loss_scale(cfg.num_microbatches)
        losses = forward_backward(
            forward_step_func=forward_step,
            data_iterator=batches,
            model=model,
            num_microbatches=cfg.num_microbatches,
            seq_length=cfg.seq_length,
            micro_batch_size=cfg.micro_batch_size,
            forward_only=False,
        )
        params = [p for p in model.parameters() if p.grad is not None]
        if cfg.clip_grad > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad))
        else:
            grad_norm = float(torch.norm(torch.stack([p.grad.norm() for p in params])))
        optimizer.step()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()

        lm_loss = _mean_lm_loss(losses)
        stats = tracker.summary(
            num_layers, groups=[parallel_state.get_pipeline_model_parallel_group()]
        )
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
            kept = " ".join(f"{k}:{v:.2f}" for k, v in sorted(result.kept_fraction.items()))
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
