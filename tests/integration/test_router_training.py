"""Router learning-rate multiplier and router-only training (megatron_mod.training.param_groups)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.usefixtures("device_guard")


def _model():
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_mod.config import MoDConfig
    from megatron_mod.models import build_gpt_model, llama_config

    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    return build_gpt_model(
        llama_config("tiny"), MoDConfig(routed_layers="all", threshold=0.4), 96, 32
    )


def _ddp_and_optimizer(model, router_lr_mult, router_weight_decay=False):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_mod.training.param_groups import build_megatron_optimizer

    ddp = DistributedDataParallel(
        config=model.config, ddp_config=DistributedDataParallelConfig(), module=model
    )
    config = OptimizerConfig(optimizer="adam", lr=1e-3, min_lr=1e-4, weight_decay=0.1)
    optimizer = build_megatron_optimizer(
        config, [ddp], router_lr_mult=router_lr_mult, router_weight_decay=router_weight_decay
    )
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=1e-3, min_lr=1e-4, lr_warmup_steps=0, lr_decay_steps=10,
        lr_decay_style="cosine", start_wd=0.1, end_wd=0.1, wd_incr_steps=10,
        wd_incr_style="constant",
    )  # fmt: skip
    return ddp, optimizer, scheduler


def _group_of(optimizer, param):
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    raise AssertionError("parameter not in any group")


def test_router_lr_multiplier_scales_only_the_routers_schedule(mcore):
    model = _model()
    _, optimizer, scheduler = _ddp_and_optimizer(model, router_lr_mult=10.0)
    scheduler.step(increment=3)
    router = model.decoder.layers[0].router
    qkv = model.decoder.layers[0].self_attention.linear_qkv.weight
    router_group = _group_of(optimizer, router.weight)
    base_group = _group_of(optimizer, qkv)
    assert router_group is not base_group
    assert router_group["lr"] == pytest.approx(10.0 * base_group["lr"])
    assert 1e-4 < base_group["lr"] < 1e-3
    # megatron's standard overrides still apply: no weight decay on biases, norms.
    assert _group_of(optimizer, router.bias)["wd_mult"] == 0.0
    assert router_group["wd_mult"] == 0.0
    assert base_group["wd_mult"] == 1.0


@pytest.mark.parametrize("lr_mult", [1.0, 3.0])
def test_router_weights_are_exempt_from_weight_decay_unless_asked(mcore, lr_mult):
    model = _model()
    router = model.decoder.layers[0].router
    qkv = model.decoder.layers[0].self_attention.linear_qkv.weight
    _, optimizer, scheduler = _ddp_and_optimizer(model, router_lr_mult=lr_mult)
    scheduler.step(increment=1)
    assert router.weight.dim() == 2  # the standard rule (1-D and biases) would decay it
    assert _group_of(optimizer, router.weight)["wd_mult"] == 0.0
    assert _group_of(optimizer, router.weight)["weight_decay"] == 0.0
    assert _group_of(optimizer, qkv)["weight_decay"] == pytest.approx(0.1)
    model = _model()
    _, optimizer, scheduler = _ddp_and_optimizer(model, lr_mult, router_weight_decay=True)
    scheduler.step(increment=1)
    router = model.decoder.layers[0].router
    assert _group_of(optimizer, router.weight)["weight_decay"] == pytest.approx(0.1)
    assert _group_of(optimizer, router.bias)["weight_decay"] == 0.0


def test_routers_only_freezes_the_base_model_and_trains_the_routers(mcore):
    from megatron_mod import platform
    from megatron_mod.training.param_groups import freeze_all_but_routers

    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = freeze_all_but_routers(model)
    routers = [n for n, p in model.named_parameters() if p.requires_grad]
    assert routers and all(".router." in n for n in routers)
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    ddp, optimizer, _ = _ddp_and_optimizer(model, router_lr_mult=1.0)
    tokens = torch.randint(0, 96, (2, 32)).to(platform.device())
    positions = torch.arange(32, device=platform.device())[None].expand(2, -1)
    ddp.zero_grad_buffer()
    ddp(tokens, positions, None, labels=tokens).float().mean().backward()
    ddp.finish_grad_sync()
    updated, _, _ = optimizer.step()
    assert updated
    for name, param in model.named_parameters():
        moved = not torch.equal(param.detach(), before[name])
        assert moved == (".router." in name), name


def test_routers_only_refuses_a_dense_model(mcore):
    from megatron_mod.models import build_gpt_model, llama_config
    from megatron_mod.training.param_groups import freeze_all_but_routers

    dense = build_gpt_model(llama_config("tiny"), None, 96, 32)
    with pytest.raises(ValueError, match="no router parameters"):
        freeze_all_but_routers(dense)
