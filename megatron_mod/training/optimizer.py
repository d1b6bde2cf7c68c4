"""Wrap a model for training: megatron-core DDP, the Megatron optimizer and its LR schedule.

The same three pieces Megatron-LM's ``pretrain_gpt.py`` uses, configured from
:class:`~megatron_mod.training.loop.TrainConfig`:

* ``DistributedDataParallel`` keeps gradients in contiguous buffers and reduces them over the
  data-parallel group (averaged, like the LM loss; the load-reducing loss is averaged the same
  way because it rides on the same backward pass);
* ``get_megatron_optimizer`` builds Adam with fp32 main weights for bf16 parameters, no weight
  decay on biases and norms, gradient clipping by the global norm over all model-parallel ranks,
  and, with ``use_distributed_optimizer``, optimizer state sharded over data-parallel ranks;
* ``OptimizerParamScheduler`` gives linear warmup then decay (``lr_decay_style``, cosine by
  default) to ``min_lr`` over ``lr_decay_iters``.

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

__all__ = ["setup_model_and_optimizer", "current_lr", "clip_and_step"]


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
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_mod.training.param_groups import build_megatron_optimizer, freeze_all_but_routers

    config = model.config
    if cfg.train_routers_only:
        freeze_all_but_routers(model)  # before DDP: it and the optimizer take trainable ones
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.overlap_grad_reduce,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )
    ddp_model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    optimizer = build_megatron_optimizer(
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
        router_lr_mult=cfg.router_lr_mult,
        router_weight_decay=cfg.router_weight_decay,
    )
    _fix_distributed_optimizer_index_maps(optimizer)
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
        lr_warmup_steps=min(cfg.lr_warmup_iters, cfg.decay_iters - 1),
        lr_decay_steps=cfg.decay_iters,
        lr_decay_style=cfg.lr_decay_style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=cfg.decay_iters,
        wd_incr_style="constant",
    )
    return ddp_model, optimizer, scheduler


def current_lr(optimizer) -> float:
    """The learning rate of the optimizer's first parameter group."""
    return float(optimizer.param_groups[0]["lr"])


def clip_and_step(optimizer, grad_norm: float) -> bool:
    """Clip the prepared main gradients to ``clip_grad`` by ``grad_norm`` and update.

    The second half of megatron-core's ``ChainedOptimizer.step``: the trainer calls
    ``prepare_grads`` and ``get_grad_norm`` itself first, so that a non-finite loss or norm can
    skip the update on every rank before any parameter changes.

    Args:
        optimizer: the Megatron optimizer (chained or a single one).
        grad_norm: the global gradient norm from ``optimizer.get_grad_norm()``.

    Returns:
        Whether the update succeeded.
    """
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(opt, "is_stub_optimizer", False):
            continue
        params = opt.get_parameters()
        if params and opt.config.clip_grad > 0.0:
            clip_grad_by_total_norm_fp32(
                params,
                max_norm=opt.config.clip_grad,
                total_norm=grad_norm,
                use_decoupled_grad=getattr(
                    opt.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False
                ),
            )
    return optimizer.step_with_ready_grads()


def _fix_distributed_optimizer_index_maps(optimizer) -> None:
    """Point each parameter at its own optimizer state in the distributed optimizer's map.

    megatron-core's ``DistributedOptimizer`` numbers the parameters of a param group in
    gradient-buffer order, but orders the group's main parameters fp32 first, then the fp32
    copies of bf16 parameters. A MoD model mixes both in one group (fp32 routers in a bf16
    model), so the two orders differ and its checkpoint code, which goes through this map,
    would pair parameters with other parameters' states. Rebuilt here in the group's order.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, DistributedOptimizer) or not hasattr(opt, "model_fp32_groups"):
            continue
        for group_index, (fp32, float16) in enumerate(
            zip(opt.model_fp32_groups, opt.model_float16_groups, strict=True)
        ):
            for order, param in enumerate([*fp32, *float16]):
                opt.model_param_group_index_map[param] = (group_index, order)
