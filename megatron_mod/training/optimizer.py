"""Wrap a model for training: megatron-core DDP, the Megatron optimizer and its LR schedule.

The same three pieces Megatron-LM's ``pretrain_gpt.py`` uses, configured from
:class:`~megatron_mod.training.loop.TrainConfig`:

* ``DistributedDataParallel`` keeps gradients in contiguous buffers and reduces them over the
  data-parallel group (averaged, like the LM loss; the load-reducing loss is averaged the same
  way because it rides on the same backward pass);
* ``get_megatron_optimizer`` builds Adam with fp32 main weights for bf16 parameters, no weight
  decay on biases and norms, gradient clipping by the global norm over all model-parallel ranks,
  and, with ``use_distributed_optimizer``, optimizer state sharded over data-parallel ranks;
* ``OptimizerParamScheduler`` gives linear warmup then cosine decay to ``min_lr``.

The routers stay fp32 in a bf16 model; the optimizer updates them directly (fp32 parameters need
no main copy). ``finalize_model_grads`` is installed on the model config so the schedule reduces
data-parallel gradients and the sequence-parallel gradients of norms and routers (marked
``sequence_parallel``) over the tensor-parallel group after the last micro-batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from megatron_mod.training.loop import TrainConfig

__all__ = ["setup_model_and_optimizer", "current_lr"]


def setup_model_and_optimizer(model: torch.nn.Module, cfg: TrainConfig):
    """Wrap this rank's model in DDP and build the optimizer and LR scheduler.

    Args:
        model: this rank's GPTModel (one pipeline stage), already holding its weights.
        cfg: optimisation settings.

    Returns:
        ``(ddp_model, optimizer, scheduler)``. ``ddp_model`` shares its parameters with
        ``model``, so saving ``model`` after training saves the trained weights.
    """
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = model.config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.overlap_grad_reduce,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )
    ddp_model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=cfg.lr,
            min_lr=cfg.min_lr,
            weight_decay=cfg.weight_decay,
            adam_beta1=0.9,
            adam_beta2=0.95,
            clip_grad=cfg.clip_grad,
            bf16=bool(config.bf16),
            fp16=False,
            params_dtype=config.params_dtype,
            use_distributed_optimizer=cfg.use_distributed_optimizer,
        ),
        [ddp_model],
    )
    # The schedule calls these: gradient reduction after the last micro-batch, no gradient sync
    # between micro-batches of one step, and the loss scale (1.0 without fp16).
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp_model.no_sync
    config.grad_scale_func = optimizer.scale_loss
    if cfg.overlap_grad_reduce:
        config.grad_sync_func = ddp_model.start_grad_sync
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        # The scheduler needs warmup < decay steps; a very short run simply warms up less.
        lr_warmup_steps=min(cfg.lr_warmup_iters, cfg.train_iters - 1),
        lr_decay_steps=cfg.train_iters,
        lr_decay_style="cosine",
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=cfg.train_iters,
        wd_incr_style="constant",
    )
    return ddp_model, optimizer, scheduler


def current_lr(optimizer) -> float:
    """The learning rate of the optimizer's first parameter group."""
    return float(optimizer.param_groups[0]["lr"])
