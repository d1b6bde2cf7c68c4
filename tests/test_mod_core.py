"""Single-process tests of the MoD core: routing, dispatch, the routed layer, the model."""

from __future__ import annotations

import math

import pytest
import torch

from tests.mod_reference import mod_layer_reference

VOCAB = 96
SEQ = 24

# Every test here runs under the device guard: a host tensor where a GPU run needs the compute
# device fails the test (megatron_mod.device_guard).
pytestmark = pytest.mark.usefixtures("device_guard")
DEVICE = torch.device("cpu")  # tests run on CPU; an explicit device keeps the guard satisfied


def _tiny(**overrides):
    from megatron_mod.models import llama_config

    return llama_config("tiny", **overrides)


def _model(mod_config, seed=7, **overrides):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_mod.models import build_gpt_model

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return build_gpt_model(_tiny(**overrides), mod_config, vocab_size=VOCAB, max_seq_len=64)


def _copy_dense_weights(dense, mod_model):
    missing, unexpected = mod_model.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected
    assert all(".router." in k for k in missing), missing


def _batch(batch=3, seq=SEQ, seed=0):
    from megatron_mod import platform

    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, seq), generator=gen)
    positions = torch.arange(seq)[None].expand(batch, -1)
    return tokens.to(platform.device()), positions.to(platform.device())


def _routed_layers(model):
    from megatron_mod.layer import MoDTransformerLayer

    return [m for m in model.decoder.layers if isinstance(m, MoDTransformerLayer)]


def _randomise_routers(model, std=1.0, bias=0.0, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in _routed_layers(model):
            w = torch.randn(layer.router.weight.shape, generator=gen) * std
            layer.router.weight.copy_(w)
            layer.router.bias.fill_(bias)


def _layer_and_rope(mod_config, seq):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.spec_utils import build_module

    from megatron_mod.specs import get_mod_layer_spec

    torch.manual_seed(11)
    model_parallel_cuda_manual_seed(11)
    config = _tiny()
    layer = build_module(get_mod_layer_spec(mod_config), config=config, layer_number=1)
    rope = RotaryEmbedding(kv_channels=config.kv_channels, rotary_percent=1.0, rotary_base=10000)(
        seq
    )
    return layer, rope, config


# ------------------------------------------------------------------------------ dense parity


def test_dense_parity_straight_through_p0(mcore):
    from megatron_mod.config import MoDConfig

    dense = _model(None)
    mod = _model(MoDConfig(gate="straight_through", threshold=0.0, routed_layers="all"))
    _copy_dense_weights(dense, mod)
    _randomise_routers(mod)  # any router: p = 0 keeps everything
    tokens, positions = _batch()
    labels = torch.roll(tokens, -1, dims=1)
    with torch.no_grad():
        ref_logits = dense(tokens, positions, None)
        mod_logits = mod(tokens, positions, None)
        ref_loss = dense(tokens, positions, None, labels=labels).mean()
        mod_loss = mod(tokens, positions, None, labels=labels).mean()
    torch.testing.assert_close(mod_logits, ref_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(mod_loss, ref_loss, rtol=0, atol=1e-6)
    for layer in _routed_layers(mod):
        assert bool(layer.last_keep.all())
    assert len(_routed_layers(mod)) == 4


def test_default_config_routes_every_other_layer_and_keeps_all_at_init(mcore):
    from megatron_mod.config import MoDConfig
    from megatron_mod.layer import MoDTransformerLayer

    mod = _model(MoDConfig())
    kinds = [isinstance(m, MoDTransformerLayer) for m in mod.decoder.layers]
    assert kinds == [False, True, False, True]
    tokens, positions = _batch()
    with torch.no_grad():
        mod(tokens, positions, None)
    # bias +2 with small weights: g ~ 0.88 >= 0.5 for every token
    for layer in _routed_layers(mod):
        assert bool(layer.last_keep.all())


# ------------------------------------------------------------------------------ routing


def test_threshold_selection_is_exactly_g_ge_p():
    from megatron_mod.config import MoDConfig
    from megatron_mod.router import select_tokens

    logits = torch.randn(50, 4)
    # put some logits exactly on the boundary: sigmoid(0) = 0.5
    logits[0, 0] = 0.0
    logits[1, 1] = -1e-3
    decision = select_tokens(logits, MoDConfig(threshold=0.5))
    assert torch.equal(decision.keep, torch.sigmoid(logits) >= 0.5)
    assert bool(decision.keep[0, 0]) and not bool(decision.keep[1, 1])


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
    model = _model(mod_config)
    _randomise_routers(model, std=0.6)
    tokens, positions = _batch()
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
        for layer in _routed_layers(model)
    ]
    with torch.no_grad():
        model(tokens, positions, None)
    for h in hooks:
        h.remove()

    stats = tracker.summary(num_layers=4)
    assert sorted(stats) == [1, 3]
    for layer in _routed_layers(model):
        h = captured[layer.global_layer_index]
        g = torch.sigmoid(
            h.float() @ layer.router.weight.detach().t().squeeze(-1) + layer.router.bias
        )
        f_hand = (g >= 0.5).float().mean().item()
        s = stats[layer.global_layer_index]
        assert s.kept_fraction == pytest.approx(f_hand, abs=1e-7)
        assert s.mean_gate == pytest.approx(g.mean().item(), abs=1e-6)
        assert s.load_loss == pytest.approx(0.05 * f_hand * g.mean().item(), rel=1e-5)
        assert 0.0 < f_hand < 1.0
    c_eff = MoDMetricsTracker.effective_capacity(stats, 4)
    assert c_eff == pytest.approx((2 + stats[1].kept_fraction + stats[3].kept_fraction) / 4)
    tracker.clear()


# ------------------------------------------------------------------------------ layer vs reference


@pytest.mark.parametrize("gate", ["scale", "straight_through"])
def test_mod_layer_matches_independent_reference(mcore, gate):
    from megatron_mod.config import MoDConfig

    seq, batch = 20, 3
    layer, rope, _ = _layer_and_rope(MoDConfig(gate=gate, routed_layers="all"), seq)
    with torch.no_grad():
        layer.router.weight.normal_(0, 1.0)
        layer.router.bias.zero_()
    hidden = torch.randn(seq, batch, layer.config.hidden_size, device=DEVICE)
    with torch.no_grad():
        out, _ = layer(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rope)
        ref, keep = mod_layer_reference(layer, hidden, 10000, 0.5, gate)
    counts = keep.sum(0)
    assert counts.min() < seq and counts.max() > 0, "routing must be non-trivial"
    assert len(set(counts.tolist())) > 1, "sequences should keep different numbers of tokens"
    assert torch.equal(layer.last_keep, keep)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # skipped tokens pass through bit-exactly
    assert torch.equal(out[~keep], hidden[~keep])


def test_topk_layer_matches_reference(mcore):
    from megatron_mod.config import MoDConfig
    from megatron_mod.router import select_tokens

    seq, batch = 16, 2
    mod_config = MoDConfig(routing="topk", capacity=0.25, routed_layers="all")
    layer, rope, _ = _layer_and_rope(mod_config, seq)
    with torch.no_grad():
        layer.router.weight.normal_(0, 1.0)
    hidden = torch.randn(seq, batch, layer.config.hidden_size, device=DEVICE)
    with torch.no_grad():
        out, _ = layer(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rope)
        logits = layer.router(hidden)
        keep = select_tokens(logits, mod_config).keep
        ref, _ = mod_layer_reference(layer, hidden, 10000, None, "scale", keep=keep)
    assert keep.sum(0).tolist() == [4, 4]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_degenerate_routing_cases(mcore):
    from megatron_mod.config import MoDConfig

    seq, batch = 12, 2
    layer, rope, config = _layer_and_rope(MoDConfig(routed_layers="all"), seq)
    hidden = torch.randn(seq, batch, config.hidden_size, device=DEVICE)
    # Router reads one feature: its sign decides, so sequences can be made all-kept / all-skipped.
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 50.0
        layer.router.bias.zero_()

    # 1. nothing kept anywhere: the layer is the identity
    hidden[:, :, 0] = -1.0
    with torch.no_grad():
        out, _ = layer(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rope)
    assert torch.equal(out, hidden)
    assert not bool(layer.last_keep.any())

    # 2. one sequence empty, the other full
    hidden[:, 1, 0] = 1.0
    with torch.no_grad():
        out, _ = layer(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rope)
        ref, keep = mod_layer_reference(layer, hidden, 10000, 0.5, "scale")
    assert keep[:, 0].sum() == 0 and keep[:, 1].sum() == seq
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[:, 0], hidden[:, 0])

    # 3. all kept
    hidden[:, 0, 0] = 1.0
    with torch.no_grad():
        out, _ = layer(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rope)
        ref, keep = mod_layer_reference(layer, hidden, 10000, 0.5, "scale")
    assert bool(keep.all())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_zero_kept_still_gives_router_load_loss_gradient(mcore):
    from megatron_mod.config import MoDConfig

    seq, batch = 8, 2
    layer, rope, config = _layer_and_rope(MoDConfig(routed_layers="all"), seq)
    with torch.no_grad():
        layer.router.bias.fill_(-5.0)
    hidden = torch.randn(seq, batch, config.hidden_size, device=DEVICE)
    out, _ = layer(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rope)
    assert not bool(layer.last_keep.any())
    out.sum().backward()
    # F_j = 0 makes R = 0 * G: its gradient is 0, and no token carries a gate gradient.
    assert layer.router.bias.grad is not None
    assert float(layer.router.bias.grad.abs()) == 0.0


# ------------------------------------------------------------------------------ gradients


def test_gradient_reaches_router_through_gate(mcore):
    from megatron_mod.config import MoDConfig

    seq, batch = 10, 2
    layer, rope, config = _layer_and_rope(
        MoDConfig(routed_layers="all", load_loss_coeff=0.0, gate="scale"), seq
    )
    hidden = torch.randn(seq, batch, config.hidden_size, device=DEVICE)
    out, _ = layer(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rope)
    out.pow(2).sum().backward()

    # Analytic: out = h + g * (y - h) for kept tokens, L = sum(out^2), dg/db = g (1 - g).
    with torch.no_grad():
        ref_out, keep = mod_layer_reference(layer, hidden, 10000, 0.5, "scale")
        y, _ = mod_layer_reference(layer, hidden, 10000, 0.5, "straight_through")
        g = torch.sigmoid(layer.router(hidden))
        dl_dg = (2 * ref_out * (y - hidden)).sum(-1)
        expected = (dl_dg * g * (1 - g))[keep].sum()
    assert bool(keep.all())
    torch.testing.assert_close(layer.router.bias.grad[0], expected, rtol=1e-4, atol=1e-6)
    assert layer.router.weight.grad.abs().sum() > 0


def test_straight_through_gradient_reaches_router(mcore):
    from megatron_mod.config import MoDConfig

    seq, batch = 10, 2
    layer, rope, config = _layer_and_rope(
        MoDConfig(routed_layers="all", load_loss_coeff=0.0, gate="straight_through"), seq
    )
    hidden = torch.randn(seq, batch, config.hidden_size, device=DEVICE)
    out, _ = layer(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rope)
    out.pow(2).sum().backward()
    assert layer.router.bias.grad.abs() > 0


def test_load_loss_value_and_gradient_numerically(mcore):
    from megatron_mod.config import MoDConfig
    from megatron_mod.metrics import get_metrics_tracker
    from megatron_mod.router import set_load_loss_scale

    alpha = 0.3
    mod_config = MoDConfig(routed_layers="all", load_loss_coeff=alpha)
    model = _model(mod_config)
    _randomise_routers(model, std=0.5, bias=0.2)
    model.train()
    tokens, positions = _batch(batch=2)
    tracker = get_metrics_tracker()
    tracker.clear()
    set_load_loss_scale(num_microbatches=1)
    out = model(tokens, positions, None)
    # Only R contributes: the LM output is multiplied by 0.
    (out * 0.0).sum().backward()
    stats = tracker.summary(num_layers=4)
    tracker.clear()

    for layer in _routed_layers(model):
        s = stats[layer.global_layer_index]
        # R_j = alpha F_j G_j with G_j = mean sigmoid(w.h + b):  dR_j/db = alpha F_j mean(g(1-g))
        assert s.load_loss == pytest.approx(alpha * s.kept_fraction * s.mean_gate, rel=1e-6)
        assert layer.router.bias.grad is not None

    # Finite-difference check of d(sum_j R_j)/d(bias) for the last routed layer, whose input
    # does not depend on its own bias.
    last = _routed_layers(model)[-1]
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
    layer, rope, config = _layer_and_rope(
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

    model = _model(MoDConfig(routed_layers="all"))
    _randomise_routers(model, std=0.8, bias=0.0)
    tokens, positions = _batch(batch=2, seq=SEQ)
    prefix = 13
    with torch.no_grad():
        full = model(tokens, positions, None)
        part = model(tokens[:, :prefix].contiguous(), positions[:, :prefix].contiguous(), None)
    fractions = [float(layer.last_keep.float().mean()) for layer in _routed_layers(model)]
    assert any(0.0 < f < 1.0 for f in fractions), fractions
    torch.testing.assert_close(part, full[:, :prefix], rtol=1e-5, atol=1e-5)


def test_topk_routing_is_not_causal(mcore):
    """Documents why top-k needs a decode-time fallback: prefixes change the kept set."""
    from megatron_mod.config import MoDConfig

    model = _model(MoDConfig(routing="topk", capacity=0.25, routed_layers="all"))
    _randomise_routers(model, std=0.8, bias=0.0)
    tokens, positions = _batch(batch=2, seq=SEQ)
    prefix = 9
    with torch.no_grad():
        full = model(tokens, positions, None)
        part = model(tokens[:, :prefix].contiguous(), positions[:, :prefix].contiguous(), None)
    assert not torch.allclose(part, full[:, :prefix], atol=1e-4)


# ------------------------------------------------------------------------------ real skipping


def test_skipped_tokens_cost_no_layer_compute(mcore):
    """The attention/MLP submodules only ever see the compact batch of kept tokens."""
    from megatron_mod.config import MoDConfig

    seq, batch = 32, 2
    layer, rope, config = _layer_and_rope(
        MoDConfig(routing="topk", capacity=0.25, routed_layers="all", compact_length_multiple=1),
        seq,
    )
    seen = []
    layer.self_attention.linear_qkv.register_forward_hook(
        lambda m, args, out: seen.append(args[0].shape[0])
    )
    layer.mlp.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    with torch.no_grad():
        layer(
            hidden_states=torch.randn(seq, batch, config.hidden_size, device=DEVICE),
            rotary_pos_emb=rope,
        )
    assert seen == [8, 8]
