"""Router-specific optimisation: the routers' learning rate and weight decay, or routers alone.

A converted model's routers start far from any useful decision, and Adam moves each parameter
by about ``lr`` per step: at the continued-pretraining learning rates of a large model (1e-5 to
3e-5) a router bias needs tens of thousands of steps to cross from +2 to 0. ``router_lr_mult``
gives the routers their own peak and final learning rate (the LR schedule's shape is shared);
``freeze_all_but_routers`` trains the routers only, the base model frozen (the Router-Tuning
baseline). Both go through megatron-core's own parameter-group overrides.
"""

from __future__ import annotations

import inspect

import torch

__all__ = ["is_router_parameter", "freeze_all_but_routers", "build_megatron_optimizer"]

ROUTER_NAME_PATTERN = "*.router.*"
"""fnmatch pattern of router parameter names (``...decoder.layers.1.router.weight``)."""


def is_router_parameter(name: str) -> bool:
    """Whether a parameter name (as in ``named_parameters()``) belongs to a MoD router."""
    return ".router." in f".{name}"


def freeze_all_but_routers(model: torch.nn.Module) -> int:
    """Set ``requires_grad=False`` on every non-router parameter; returns the trainable count.

    Call it before wrapping the model in DDP: megatron-core's DDP and optimizer only take
    parameters that require gradients.

    Raises:
        ValueError: if the model has no router (a dense model cannot train routers only).
    """
    trainable = 0
    for name, param in model.named_parameters():
        param.requires_grad_(is_router_parameter(name))
        trainable += param.numel() if param.requires_grad else 0
    if trainable == 0:
        raise ValueError(
            "--mod-train-routers-only: the model has no router parameters (a dense checkpoint?)"
        )
    return trainable


def build_megatron_optimizer(
    optimizer_config,
    model_chunks: list,
    router_lr_mult: float = 1.0,
    router_weight_decay: bool = False,
):
    """``get_megatron_optimizer`` with the routers' own learning rate and weight decay.

    Routers follow megatron's no-weight-decay rule for gates and norms: ``router.weight`` is
    2-D (``[1, h]``), so the standard rule (biases and 1-D parameters) would decay it; here it is
    exempt unless ``router_weight_decay``. Decay would pull every router towards the zero
    router, whose logits are all equal: the state in which threshold routing cannot tell tokens
    apart. ``router_lr_mult`` scales the routers' peak and final learning rates.

    megatron-core 0.16+ takes per-parameter-group overrides (``config_overrides``, merged with
    megatron's standard no-weight-decay overrides); older releases took ``scale_lr_cond`` /
    ``lr_mult`` / ``no_weight_decay_cond``. This is the one place that knows the difference.
    """
    from megatron.core.optimizer import get_megatron_optimizer

    if router_lr_mult <= 0:
        raise ValueError(f"--mod-router-lr-mult must be > 0, got {router_lr_mult}")
    router_override = {}
    if router_lr_mult != 1.0:
        router_override["max_lr"] = optimizer_config.lr * router_lr_mult
        router_override["min_lr"] = optimizer_config.min_lr * router_lr_mult
    if not router_weight_decay:
        router_override["wd_mult"] = 0.0
    if not router_override:
        return get_megatron_optimizer(optimizer_config, model_chunks)
    params = inspect.signature(get_megatron_optimizer).parameters
    if "config_overrides" in params:
        from megatron.core.optimizer import get_standard_config_overrides
        from megatron.core.optimizer.optimizer_config import ParamKey

        overrides = dict(get_standard_config_overrides(optimizer_config) or {})
        overrides[ParamKey(name=ROUTER_NAME_PATTERN)] = router_override
        return get_megatron_optimizer(optimizer_config, model_chunks, config_overrides=overrides)
    legacy = {}
    if router_lr_mult != 1.0:
        legacy["scale_lr_cond"] = lambda name, param: is_router_parameter(name)
        legacy["lr_mult"] = router_lr_mult
    if not router_weight_decay:
        legacy["no_weight_decay_cond"] = lambda name, param: (
            is_router_parameter(name) or name.endswith(".bias") or len(param.shape) == 1
        )
    return get_megatron_optimizer(optimizer_config, model_chunks, **legacy)
