"""The routed layer (megatron_mod.layer): dense parity, an independent reference, degenerate
routing, the gate's gradient to the router, and real skipping of compute."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.mod_models import (
    DEVICE,
    build_model,
    copy_dense_weights,
    layer_and_rope,
    random_batch,
    randomise_routers,
    routed_layers,
)
from tests.helpers.mod_reference import mod_layer_reference

# Every test here runs under the device guard: a host tensor where a GPU run needs the compute
# device fails the test (megatron_mod.device_guard).
pytestmark = pytest.mark.usefixtures("device_guard")


# ------------------------------------------------------------------------------ dense parity


def test_dense_parity_straight_through_p0(mcore):
    from megatron_mod.config import MoDConfig

    dense = build_model(None)
    mod = build_model(MoDConfig(gate="straight_through", threshold=0.0, routed_layers="all"))
    copy_dense_weights(dense, mod)
    randomise_routers(mod)  # any router: p = 0 keeps everything
    tokens, positions = random_batch()
    labels = torch.roll(tokens, -1, dims=1)
    with torch.no_grad():
        ref_logits = dense(tokens, positions, None)
        mod_logits = mod(tokens, positions, None)
        ref_loss = dense(tokens, positions, None, labels=labels).mean()
        mod_loss = mod(tokens, positions, None, labels=labels).mean()
    torch.testing.assert_close(mod_logits, ref_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(mod_loss, ref_loss, rtol=0, atol=1e-6)
    for layer in routed_layers(mod):
        assert bool(layer.last_keep.all())
    assert len(routed_layers(mod)) == 4


def test_default_config_routes_every_other_layer_and_keeps_all_at_init(mcore):
    from megatron_mod.config import MoDConfig
    from megatron_mod.layer import MoDTransformerLayer

    mod = build_model(MoDConfig())
    kinds = [isinstance(m, MoDTransformerLayer) for m in mod.decoder.layers]
    assert kinds == [False, True, False, True]
    tokens, positions = random_batch()
    with torch.no_grad():
        mod(tokens, positions, None)
    # bias +2 with small weights: g ~ 0.88 >= 0.5 for every token
    for layer in routed_layers(mod):
        assert bool(layer.last_keep.all())


# ------------------------------------------------------------------------------ layer vs reference


@pytest.mark.parametrize("gate", ["scale", "straight_through"])
def test_mod_layer_matches_independent_reference(mcore, gate):
    from megatron_mod.config import MoDConfig

    seq, batch = 20, 3
    layer, rope, _ = layer_and_rope(MoDConfig(gate=gate, routed_layers="all"), seq)
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
    layer, rope, _ = layer_and_rope(mod_config, seq)
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
    layer, rope, config = layer_and_rope(
        MoDConfig(routed_layers="all", keep_first_token=False), seq
    )
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
    layer, rope, config = layer_and_rope(
        MoDConfig(routed_layers="all", keep_first_token=False), seq
    )
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
    layer, rope, config = layer_and_rope(
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
    layer, rope, config = layer_and_rope(
        MoDConfig(routed_layers="all", load_loss_coeff=0.0, gate="straight_through"), seq
    )
    hidden = torch.randn(seq, batch, config.hidden_size, device=DEVICE)
    out, _ = layer(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rope)
    out.pow(2).sum().backward()
    assert layer.router.bias.grad.abs() > 0


# ------------------------------------------------------------------------------ real skipping


def test_skipped_tokens_cost_no_layer_compute(mcore):
    """The attention/MLP submodules only ever see the compact batch of kept tokens."""
    from megatron_mod.config import MoDConfig

    seq, batch = 32, 2
    layer, rope, config = layer_and_rope(
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


def test_sequence_parallel_gathers_logits_over_the_layers_own_tp_group(mcore, monkeypatch):
    """Under SP the router logits are gathered over the layer's pg_collection TP group, the
    group its token planning and dispatch use, not megatron's global default."""
    from types import SimpleNamespace

    import megatron_mod.layer as layer_module
    from megatron_mod.config import MoDConfig

    layer, rope, config = layer_and_rope(MoDConfig(threshold=0.5), seq=8)
    own_group = torch.distributed.new_group([0])
    layer._pg_collection = SimpleNamespace(tp=own_group)
    seen = []
    real_gather = layer_module.gather_from_sequence_parallel_region

    def recording_gather(tensor, *args, **kwargs):
        seen.append(kwargs.get("group"))
        return real_gather(tensor, *args, **kwargs)

    monkeypatch.setattr(layer_module, "gather_from_sequence_parallel_region", recording_gather)
    monkeypatch.setattr(config, "sequence_parallel", True)
    monkeypatch.setattr(layer.config, "sequence_parallel", True)
    hidden = torch.randn(8, 2, config.hidden_size, device=DEVICE)
    with torch.no_grad():
        layer(hidden, attention_mask=None, rotary_pos_emb=rope)
    assert seen and all(group is own_group for group in seen)


# ------------------------------------------------------------------------------ skipped_kv


@pytest.mark.parametrize("gate", ["scale", "straight_through"])
def test_skipped_kv_layer_matches_dense_layer_with_skipped_outputs_discarded(mcore, gate):
    """Kept tokens attend to every earlier token's K/V, skipped tokens pass through unchanged."""
    from megatron_mod.config import MoDConfig

    seq, batch = 20, 3
    mod_config = MoDConfig(gate=gate, routed_layers="all", skipped_kv=True)
    layer, rope, _ = layer_and_rope(mod_config, seq)
    with torch.no_grad():
        layer.router.weight.normal_(0, 1.0)
        layer.router.bias.zero_()
    hidden = torch.randn(seq, batch, layer.config.hidden_size, device=DEVICE)
    with torch.no_grad():
        out, _ = layer(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rope)
        ref, keep = mod_layer_reference(layer, hidden, 10000, 0.5, gate, skipped_kv=True)
        kept_only, _ = mod_layer_reference(layer, hidden, 10000, 0.5, gate)
    counts = keep.sum(0)
    assert counts.min() < seq - 1 and len(set(counts.tolist())) > 1
    assert torch.equal(layer.last_keep, keep)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[~keep], hidden[~keep])
    # The two K/V modes differ: seeing the skipped tokens changes the kept tokens' outputs.
    assert (out - kept_only)[keep].abs().max() > 1e-3


def test_skipped_kv_layer_with_document_mask(mcore):
    from megatron_mod.config import MoDConfig

    seq, batch = 16, 2
    layer, rope, _ = layer_and_rope(MoDConfig(routed_layers="all", skipped_kv=True), seq)
    with torch.no_grad():
        layer.router.weight.normal_(0, 1.0)
        layer.router.bias.zero_()
    hidden = torch.randn(seq, batch, layer.config.hidden_size, device=DEVICE)
    # Two documents per sequence, split at different places: block-diagonal causal masks.
    mask = torch.ones(batch, 1, seq, seq, dtype=torch.bool, device=DEVICE)
    for col, split in enumerate((6, 11)):
        for start, end in ((0, split), (split, seq)):
            mask[col, 0, start:end, start:end] = torch.ones(
                end - start, end - start, dtype=torch.bool, device=DEVICE
            ).triu(1)
    with torch.no_grad():
        out, _ = layer(hidden_states=hidden, attention_mask=mask, rotary_pos_emb=rope)
        ref, _ = mod_layer_reference(
            layer, hidden, 10000, 0.5, "scale", attention_mask=mask, skipped_kv=True
        )
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_skipped_kv_layer_degenerate_routing(mcore):
    """Nothing kept: the identity; everything kept: the dense layer (gated)."""
    from megatron_mod.config import MoDConfig

    seq, batch = 12, 2
    layer, rope, config = layer_and_rope(
        MoDConfig(routed_layers="all", keep_first_token=False, skipped_kv=True), seq
    )
    hidden = torch.randn(seq, batch, config.hidden_size, device=DEVICE)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.bias.fill_(-5.0)
        out, _ = layer(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rope)
        assert torch.equal(out, hidden)
        layer.router.bias.fill_(5.0)
        out, _ = layer(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rope)
        ref, keep = mod_layer_reference(layer, hidden, 10000, 0.5, "scale")
    assert bool(keep.all())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_skipped_kv_layer_runs_queries_output_projection_and_mlp_on_kept_tokens_only(mcore):
    from megatron_mod.config import MoDConfig

    seq, batch = 32, 2
    layer, rope, config = layer_and_rope(
        MoDConfig(
            routing="topk", capacity=0.25, routed_layers="all", compact_length_multiple=1,
            skipped_kv=True,
        ),
        seq,
    )  # fmt: skip
    seen = {}
    for name, module in (
        ("qkv", layer.self_attention.linear_qkv),
        ("core_attention", layer.self_attention.core_attention),
        ("proj", layer.self_attention.linear_proj),
        ("mlp", layer.mlp),
    ):
        module.register_forward_hook(
            lambda m, args, out, name=name: seen.setdefault(name, []).append(
                [tuple(a.shape[:1]) for a in args[:3]]
            )
        )
    with torch.no_grad():
        layer(
            hidden_states=torch.randn(seq, batch, config.hidden_size, device=DEVICE),
            rotary_pos_emb=rope,
        )
    assert seen["qkv"] == [[(seq,)]]  # K/V (and Q) projections on every token
    assert seen["core_attention"] == [[(8,), (seq,), (seq,)]]  # 8 queries, every key and value
    assert seen["proj"] == [[(8,)]] and seen["mlp"] == [[(8,)]]


def test_skipped_kv_layer_trains_every_parameter(mcore):
    from megatron_mod.config import MoDConfig

    seq, batch = 10, 2
    layer, rope, config = layer_and_rope(
        MoDConfig(routed_layers="all", skipped_kv=True, router_init_std=1.0), seq
    )
    with torch.no_grad():
        layer.router.weight.normal_(0, 1.0)
        layer.router.bias.zero_()
    hidden = torch.randn(seq, batch, config.hidden_size, device=DEVICE)
    out, _ = layer(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rope)
    assert 0 < int(layer.last_keep.sum()) < seq * batch
    out.pow(2).sum().backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
