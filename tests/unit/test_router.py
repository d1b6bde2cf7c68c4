"""The router and dispatcher: threshold and top-k selection, routing metrics and the load loss,
its gradient and scaling, and causality (megatron_mod.router, dispatcher, metrics)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers.mod_models import (
    DEVICE,
    SEQ,
    build_model,
    layer_and_rope,
    random_batch,
    randomise_routers,
    routed_layers,
)
from tests.helpers.mod_reference import router_logits_reference

# Every test here runs under the device guard: a host tensor where a GPU run needs the compute
# device fails the test (megatron_mod.device_guard).
pytestmark = pytest.mark.usefixtures("device_guard")


# ------------------------------------------------------------------------------ routing


def test_threshold_selection_is_exactly_g_ge_p():
    from megatron_mod.config import MoDConfig
    from megatron_mod.router import select_tokens

    logits = torch.randn(50, 4)
    # put some logits exactly on the boundary: sigmoid(0) = 0.5
    logits[0, 0] = 0.0
    logits[1, 1] = -1e-3
    decision = select_tokens(logits, MoDConfig(threshold=0.5, keep_first_token=False))
    assert torch.equal(decision.keep, torch.sigmoid(logits) >= 0.5)
    assert bool(decision.keep[0, 0]) and not bool(decision.keep[1, 1])


def test_threshold_selection_per_layer_first_token_and_saturated_gates():
    from megatron_mod.config import MoDConfig
    from megatron_mod.router import gate_threshold_logit, select_tokens

    torch.manual_seed(0)
    logits = torch.randn(40, 3) * 3
    logits[0] = -10.0  # the first token would be skipped everywhere
    mod = MoDConfig(threshold=0.5, layer_thresholds={3: 0.8})
    own = select_tokens(logits, mod, layer_index=3).keep
    other = select_tokens(logits, mod, layer_index=5).keep
    assert torch.equal(own[1:], torch.sigmoid(logits[1:]) >= 0.8)
    assert torch.equal(other[1:], logits[1:] >= 0.0)
    assert bool(own[0].all()) and bool(other[0].all())  # the attention sink is never skipped
    # Far in the tail fp32 gates are all exactly 1.0; logits still separate the tokens.
    tail = torch.linspace(20.0, 30.0, 11)[:, None]
    p = 1.0 / (1.0 + math.exp(-25.0))
    mod = MoDConfig(layer_thresholds={1: p}, keep_first_token=False)
    keep = select_tokens(tail, mod, layer_index=1).keep[:, 0]
    assert torch.sigmoid(tail).eq(1.0).all()
    assert keep.tolist() == [v >= 25.0 for v in tail[:, 0].tolist()]
    assert gate_threshold_logit(p) == pytest.approx(25.0, abs=1e-4)  # float64 round trip
    assert gate_threshold_logit(0.0) == -math.inf and gate_threshold_logit(1.0) == math.inf


def test_logit_quantiles_match_torch_quantile():
    from megatron_mod.router import QUANTILE_GRID, logit_quantiles

    torch.manual_seed(1)
    logits = torch.randn(97, 5, device=DEVICE)
    probs = torch.linspace(0, 1, QUANTILE_GRID, device=DEVICE)
    expected = torch.quantile(logits.reshape(-1), probs)
    torch.testing.assert_close(logit_quantiles(logits), expected, rtol=0, atol=1e-6)


def test_rms_normed_router_input_ignores_the_scale_of_h(mcore):
    from megatron_mod.config import MoDConfig
    from megatron_mod.router import MoDRouter
    from tests.helpers.mod_models import tiny_config

    config = tiny_config()
    torch.manual_seed(2)
    normed = MoDRouter(config, MoDConfig(router_init_std=1.0)).to(DEVICE)
    raw = MoDRouter(config, MoDConfig(router_init_std=1.0, router_input="hidden")).to(DEVICE)
    raw.load_state_dict(normed.state_dict())
    h = torch.randn(8, 2, config.hidden_size, device=DEVICE)
    torch.testing.assert_close(normed(h * 100.0), normed(h), rtol=1e-5, atol=1e-5)
    rms = h.pow(2).mean(-1, keepdim=True).add(config.layernorm_epsilon).rsqrt()
    torch.testing.assert_close(normed(h), raw(h * rms), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("capacity", [0.125, 0.3, 0.5, 1.0])
def test_topk_keeps_ceil_c_s_largest_per_sequence(capacity):
    from megatron_mod.config import MoDConfig
    from megatron_mod.router import select_tokens

    seq, batch = 37, 3
    logits = torch.randn(seq, batch)
    decision = select_tokens(logits, MoDConfig(routing="topk", capacity=capacity))
    k = math.ceil(capacity * seq)
    assert decision.keep.sum(0).tolist() == [k] * batch
    for col in range(batch):
        kept = logits[decision.keep[:, col], col]
        dropped = logits[~decision.keep[:, col], col]
        if dropped.numel():
            assert kept.min() > dropped.max()


def test_topk_kth_gate_is_the_smallest_kept_gate_and_tracker_averages_it():
    from megatron_mod.config import MoDConfig
    from megatron_mod.metrics import MoDMetricsTracker
    from megatron_mod.router import select_tokens

    logits = torch.randn(40, 3)
    decision = select_tokens(logits, MoDConfig(routing="topk", capacity=0.25))
    gates = torch.sigmoid(logits)
    smallest_kept = torch.stack([gates[decision.keep[:, b], b].min() for b in range(3)])
    assert decision.kth_gate.item() == pytest.approx(smallest_kept.mean().item(), abs=1e-7)
    # Thresholding at each sequence's own smallest kept gate reproduces its top-k set.
    for b in range(3):
        assert torch.equal(gates[:, b] >= smallest_kept[b], decision.keep[:, b])
    assert select_tokens(logits, MoDConfig()).kth_gate is None

    tracker = MoDMetricsTracker()
    zero = torch.tensor(0.0)
    tracker.record(1, zero, zero, zero, torch.tensor(0.6))
    tracker.record(1, zero, zero, zero, torch.tensor(0.8))
    tracker.record(3, zero, zero, zero)  # a threshold-routed micro-batch records none
    stats = tracker.summary(num_layers=4)
    assert stats[1].kth_gate == pytest.approx(0.7) and stats[3].kth_gate is None


def test_topk_decode_threshold_averages_the_last_steps():
    from megatron_mod.training.loop import StepResult
    from megatron_mod.training.pretrain import topk_decode_threshold

    def step(i, kth):
        return StepResult(i, 0.0, 0.0, 0.0, 0.0, 1.0, {}, kth)

    results = [step(i, {1: 0.1 * i, 3: 0.1 * i + 0.02}) for i in range(1, 9)]
    # last quarter of 8 steps = steps 7 and 8; layers 1 and 3
    assert topk_decode_threshold(results) == pytest.approx((0.7 + 0.72 + 0.8 + 0.82) / 4)
    with pytest.raises(ValueError, match="topk"):
        topk_decode_threshold([step(1, {})])


def test_metrics_and_load_loss_match_hand_computation(mcore):
    from megatron_mod.config import MoDConfig
    from megatron_mod.metrics import MoDMetricsTracker, get_metrics_tracker

    mod_config = MoDConfig(routed_layers="1,3", load_loss_coeff=0.05)
    model = build_model(mod_config)
    randomise_routers(model, std=0.6)
    tokens, positions = random_batch()
    tracker = get_metrics_tracker()
    tracker.clear()

    captured = {}
    hooks = [
        layer.register_forward_pre_hook(
            lambda mod, args, kwargs, i=layer.global_layer_index: captured.__setitem__(
                i, kwargs["hidden_states"].detach().clone()
            ),
            with_kwargs=True,
        )
        for layer in routed_layers(model)
    ]
    with torch.no_grad():
        model(tokens, positions, None)
    for h in hooks:
        h.remove()

    stats = tracker.summary(num_layers=4)
    assert sorted(stats) == [1, 3]
    for layer in routed_layers(model):
        h = captured[layer.global_layer_index]
        g = torch.sigmoid(router_logits_reference(layer, h))
        keep = g >= 0.5
        keep[0] = True  # the first token (attention sink) is always kept
        f_hand = keep.float().mean().item()
        s = stats[layer.global_layer_index]
        assert s.kept_fraction == pytest.approx(f_hand, abs=1e-7)
        assert s.mean_gate == pytest.approx(g.mean().item(), abs=1e-6)
        assert s.load_loss == pytest.approx(0.05 * f_hand * g.mean().item(), rel=1e-5)
        assert 0.0 < f_hand < 1.0
    c_eff = MoDMetricsTracker.effective_capacity(stats, 4)
    assert c_eff == pytest.approx((2 + stats[1].kept_fraction + stats[3].kept_fraction) / 4)
    tracker.clear()


def test_load_loss_value_and_gradient_numerically(mcore):
    from megatron_mod.config import MoDConfig
    from megatron_mod.metrics import get_metrics_tracker
    from megatron_mod.router import set_load_loss_scale

    alpha = 0.3
    mod_config = MoDConfig(routed_layers="all", load_loss_coeff=alpha)
    model = build_model(mod_config)
    randomise_routers(model, std=0.5, bias=0.2)
    model.train()
    tokens, positions = random_batch(batch=2)
    tracker = get_metrics_tracker()
    tracker.clear()
    set_load_loss_scale(num_microbatches=1)
    out = model(tokens, positions, None)
    # Only R contributes: the LM output is multiplied by 0.
    (out * 0.0).sum().backward()
    stats = tracker.summary(num_layers=4)
    tracker.clear()

    for layer in routed_layers(model):
        s = stats[layer.global_layer_index]
        # R_j = alpha F_j G_j with G_j = mean sigmoid(w.h + b):  dR_j/db = alpha F_j mean(g(1-g))
        assert s.load_loss == pytest.approx(alpha * s.kept_fraction * s.mean_gate, rel=1e-6)
        assert layer.router.bias.grad is not None

    # Finite-difference check of d(sum_j R_j)/d(bias) for the last routed layer, whose input
    # does not depend on its own bias.
    last = routed_layers(model)[-1]
    analytic = float(last.router.bias.grad)

    def total_load_loss():
        tracker.clear()
        with torch.no_grad():
            model(tokens, positions, None)
        value = sum(s.load_loss for s in tracker.summary(num_layers=4).values())
        tracker.clear()
        return value

    eps = 1e-3
    with torch.no_grad():
        last.router.bias += eps
    plus = total_load_loss()
    with torch.no_grad():
        last.router.bias -= 2 * eps
    minus = total_load_loss()
    with torch.no_grad():
        last.router.bias += eps
    # F_j is piecewise constant: pick eps small enough not to flip a token (checked below).
    numeric = (plus - minus) / (2 * eps)
    assert analytic == pytest.approx(numeric, rel=2e-2, abs=1e-7)
    assert abs(analytic) > 0


def test_load_loss_backward_scale_divides_by_microbatches(mcore):
    from megatron_mod.config import MoDConfig
    from megatron_mod.router import set_load_loss_scale

    seq, batch = 8, 2
    layer, rope, config = layer_and_rope(
        MoDConfig(routed_layers="all", load_loss_coeff=0.2, router_init_bias=0.0), seq
    )
    layer.train()
    hidden = torch.randn(seq, batch, config.hidden_size, device=DEVICE)
    grads = []
    for n in (1, 4):
        layer.zero_grad()
        set_load_loss_scale(num_microbatches=n)
        out, _ = layer(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rope)
        (out * 0.0).sum().backward()
        grads.append(layer.router.bias.grad.clone())
    set_load_loss_scale(num_microbatches=1)
    torch.testing.assert_close(grads[1] * 4, grads[0])
    assert grads[0].abs() > 0


# ------------------------------------------------------------------------------ causality


def test_threshold_routing_is_causal(mcore):
    from megatron_mod.config import MoDConfig

    model = build_model(MoDConfig(routed_layers="all"))
    randomise_routers(model, std=0.8, bias=0.0)
    tokens, positions = random_batch(batch=2, seq=SEQ)
    prefix = 13
    with torch.no_grad():
        full = model(tokens, positions, None)
        part = model(tokens[:, :prefix].contiguous(), positions[:, :prefix].contiguous(), None)
    fractions = [float(layer.last_keep.float().mean()) for layer in routed_layers(model)]
    assert any(0.0 < f < 1.0 for f in fractions), fractions
    torch.testing.assert_close(part, full[:, :prefix], rtol=1e-5, atol=1e-5)


def test_topk_routing_is_not_causal(mcore):
    """Documents why top-k needs a decode-time fallback: prefixes change the kept set."""
    from megatron_mod.config import MoDConfig

    model = build_model(MoDConfig(routing="topk", capacity=0.25, routed_layers="all"))
    randomise_routers(model, std=0.8, bias=0.0)
    tokens, positions = random_batch(batch=2, seq=SEQ)
    prefix = 9
    with torch.no_grad():
        full = model(tokens, positions, None)
        part = model(tokens[:, :prefix].contiguous(), positions[:, :prefix].contiguous(), None)
    assert not torch.allclose(part, full[:, :prefix], atol=1e-4)
