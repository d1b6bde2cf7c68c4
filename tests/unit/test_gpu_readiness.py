"""What a GPU run needs of the MoD layer, checked on CPU.

Each test here stands for a failure that a CPU run would hide: a routed layer that keeps no token
(megatron DDP expects every parameter's gradient), a gate that underflows (NaN in the
straight-through form), megatron's Float16Module casting routers, document masks, host
synchronisations, compact-length alignment, unsupported megatron features, activation
recomputation, and the device guard itself.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.host_syncs import HostSyncCounter
from tests.helpers.mod_reference import mod_layer_reference

pytestmark = pytest.mark.usefixtures("device_guard")

DEVICE = torch.device("cpu")
VOCAB = 96


def _layer_and_rope(mod_config, seq, seed=11, **config_overrides):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.spec_utils import build_module

    from megatron_mod.models import llama_config
    from megatron_mod.specs import get_mod_layer_spec

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    config = llama_config("tiny", **config_overrides)
    layer = build_module(get_mod_layer_spec(mod_config), config=config, layer_number=1)
    rope = RotaryEmbedding(kv_channels=config.kv_channels, rotary_percent=1.0, rotary_base=10000)(
        seq
    )
    return layer, rope, config


def _model(mod_config, seed=7, **overrides):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_mod.models import build_gpt_model, llama_config

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    config = llama_config("tiny", **overrides)
    return build_gpt_model(config, mod_config, vocab_size=VOCAB, max_seq_len=64)


def _tokens(batch, seq, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, seq), generator=gen).to(DEVICE)
    positions = torch.arange(seq, device=DEVICE)[None].expand(batch, -1)
    return tokens, positions


# ------------------------------------------------------------------ a layer that keeps nothing


def test_layer_that_keeps_no_token_still_gives_every_parameter_a_gradient(mcore):
    from megatron_mod.config import MoDConfig

    seq, batch = 16, 2
    layer, rope, config = _layer_and_rope(
        MoDConfig(routed_layers="all", threshold=1.0, keep_first_token=False), seq
    )
    hidden = torch.randn(seq, batch, config.hidden_size, device=DEVICE, requires_grad=True)
    out, _ = layer(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rope)
    assert not bool(layer.last_keep.any())
    assert torch.equal(out, hidden)  # the identity, exactly
    out.sum().backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        if not name.startswith("router."):
            assert float(param.grad.abs().max()) == 0.0, name
    torch.testing.assert_close(hidden.grad, torch.ones_like(hidden))


def test_ddp_overlap_grad_reduce_accepts_a_step_where_a_layer_keeps_nothing(mcore):
    """megatron DDP with overlap_grad_reduce asserts if a parameter's gradient never arrives."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_mod.config import MoDConfig

    model = _model(
        MoDConfig(threshold=1.0, keep_first_token=False)
    )  # every routed layer skips every token
    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=True, bucket_size=None
        ),
        module=model,
    )
    tokens, positions = _tokens(2, 16)
    for _ in range(2):  # the second step checks that the buckets were reset cleanly
        ddp.zero_grad_buffer()
        loss = ddp(tokens, positions, None, labels=tokens).float().mean()
        loss.backward()
        ddp.finish_grad_sync()
    routed = [m for m in model.decoder.layers if hasattr(m, "router")]
    assert routed and all(not bool(m.last_keep.any()) for m in routed)


# ------------------------------------------------------------------ straight-through stays finite


def test_straight_through_is_finite_when_gates_underflow(mcore):
    """g = sigmoid(-200) is 0 in fp32; g / g.detach() would be 0/0 = NaN."""
    from megatron_mod.config import MoDConfig

    seq, batch = 12, 2
    layer, rope, config = _layer_and_rope(
        MoDConfig(routed_layers="all", gate="straight_through", threshold=0.0), seq
    )
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.bias.fill_(-200.0)
    hidden = torch.randn(seq, batch, config.hidden_size, device=DEVICE)
    out, _ = layer(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rope)
    assert bool(layer.last_keep.all())
    with torch.no_grad():
        dense, _ = mod_layer_reference(layer, hidden, 10000, 0.0, "straight_through")
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    for name, param in layer.named_parameters():
        assert torch.isfinite(param.grad).all(), name


def test_straight_through_router_gradient_is_finite_with_padded_slots(mcore):
    """Sequences keep different counts, so padded compact slots carry skipped tokens' gates."""
    from megatron_mod.config import MoDConfig

    seq, batch = 12, 3
    layer, rope, config = _layer_and_rope(
        MoDConfig(routed_layers="all", gate="straight_through", threshold=0.5), seq
    )
    hidden = torch.randn(seq, batch, config.hidden_size, device=DEVICE)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 400.0  # gates of 0 (underflow) or 1 by the sign of feature 0
        layer.router.bias.zero_()
        hidden[:, :, 0] = torch.where(torch.rand(seq, batch) < 0.5, -1.0, 1.0).to(DEVICE)
        hidden[0, :, 0] = 1.0
        hidden[1:, 2, 0] = -1.0  # sequence 2 keeps one token: most of its slots are padding
    out, _ = layer(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rope)
    counts = layer.last_keep.sum(0)
    assert counts.min() < counts.max()
    out.square().sum().backward()
    assert torch.isfinite(layer.router.weight.grad).all()
    assert torch.isfinite(layer.router.bias.grad).all()


def test_straight_through_router_gradient_equals_the_scale_gates_at_the_token(mcore):
    """d(out)/d(g) is layer(h) - h: what the ``scale`` gate gives, without dividing by g."""
    from megatron_mod.config import MoDConfig

    seq, batch = 8, 1
    grads = {}
    for gate in ("straight_through", "scale"):
        layer, rope, config = _layer_and_rope(
            MoDConfig(routed_layers="all", gate=gate, threshold=0.0, load_loss_coeff=0.0), seq
        )
        hidden = torch.randn(seq, batch, config.hidden_size, device=DEVICE)
        gates = {}
        layer.router.register_forward_hook(lambda m, a, out, g=gates: g.setdefault("logits", out))
        out, _ = layer(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rope)
        logits = gates["logits"]
        g = torch.sigmoid(logits)
        (grad_logits,) = torch.autograd.grad(out.sum(), logits)
        grads[gate] = grad_logits / (g * (1 - g))  # d/dg from d/dlogit
    torch.testing.assert_close(grads["straight_through"], grads["scale"], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ Float16Module


def test_router_runs_in_fp32_inside_megatrons_float16_module(mcore):
    from megatron.core.transformer.module import Float16Module

    from megatron_mod.config import MoDConfig

    model = _model(MoDConfig(routed_layers="all", threshold=0.3), bf16=True)
    wrapped = Float16Module(model.config, model)  # casts every parameter, routers too, to bf16
    router = model.decoder.layers[0].router
    assert router.weight.dtype == torch.bfloat16
    logits = {}
    router.register_forward_hook(lambda m, a, out: logits.setdefault("out", out))
    tokens, positions = _tokens(2, 16)
    with torch.no_grad():
        out = wrapped(tokens, positions, None)
    assert torch.isfinite(out.float()).all()
    assert logits["out"].dtype == torch.float32


# ------------------------------------------------------------------ attention masks


def _document_mask(seq, boundary, batch):
    """megatron's mask (True = masked) for two documents [0, boundary) and [boundary, seq)."""
    causal = torch.ones(seq, seq, dtype=torch.bool, device=DEVICE).triu(1)
    doc = torch.zeros(seq, dtype=torch.long, device=DEVICE)
    doc[boundary:] = 1
    cross = doc[:, None] != doc[None, :]
    return (causal | cross)[None, None].expand(batch, 1, seq, seq).contiguous()


def test_document_mask_is_restricted_to_the_kept_tokens(mcore):
    """With routing active, a kept token of document 2 sees only document 2's kept tokens."""
    from megatron_mod.config import MoDConfig

    seq, batch, boundary = 16, 2, 7
    layer, rope, config = _layer_and_rope(
        MoDConfig(routed_layers="all", threshold=0.5, compact_length_multiple=1), seq
    )
    with torch.no_grad():
        layer.router.weight.normal_(0, 1.0)
        layer.router.bias.zero_()
    mask = _document_mask(seq, boundary, batch)
    hidden = torch.randn(seq, batch, config.hidden_size, device=DEVICE)
    with torch.no_grad():
        out, _ = layer(hidden_states=hidden, attention_mask=mask, rotary_pos_emb=rope)
        ref, keep = mod_layer_reference(layer, hidden, 10000, 0.5, "scale", attention_mask=mask)
        unmasked, _ = mod_layer_reference(layer, hidden, 10000, 0.5, "scale")
    assert torch.equal(keep, layer.last_keep)
    assert bool(keep[:boundary].any()) and bool(keep[boundary:].any())
    assert not torch.allclose(ref, unmasked, atol=1e-4)  # the mask matters here
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_all_kept_with_a_document_mask_equals_the_dense_layer(mcore):
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from megatron_mod.config import MoDConfig

    seq, batch = 16, 2
    layer, rope, config = _layer_and_rope(
        MoDConfig(routed_layers="all", gate="straight_through", threshold=0.0), seq
    )
    mask = _document_mask(seq, 6, batch)
    hidden = torch.randn(seq, batch, config.hidden_size, device=DEVICE)
    with torch.no_grad():
        out, _ = layer(hidden_states=hidden, attention_mask=mask, rotary_pos_emb=rope)
        dense, _ = TransformerLayer.forward(
            layer, hidden_states=hidden, attention_mask=mask, rotary_pos_emb=rope
        )
        unmasked, _ = TransformerLayer.forward(
            layer, hidden_states=hidden, attention_mask=None, rotary_pos_emb=rope
        )
    assert bool(layer.last_keep.all())
    assert not torch.allclose(dense, unmasked, atol=1e-4)  # the mask matters here
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ host syncs and shapes


@pytest.mark.parametrize("routing", ["threshold", "topk"])
def test_routed_layer_forward_and_backward_sync_the_host_once(mcore, routing):
    from megatron_mod.config import MoDConfig

    seq, batch = 32, 2
    layer, rope, config = _layer_and_rope(
        MoDConfig(routed_layers="all", routing=routing, threshold=0.5, capacity=0.25), seq
    )
    layer.train()
    hidden = torch.randn(seq, batch, config.hidden_size, device=DEVICE, requires_grad=True)
    with HostSyncCounter() as counter:
        out, _ = layer(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rope)
        out.sum().backward()
    assert counter.count == 1  # the compact length


def test_compact_length_is_rounded_up_to_the_configured_multiple(mcore):
    from megatron_mod.config import MoDConfig

    seq, batch = 128, 2
    for multiple, expected in ((64, 64), (16, 48), (1, 40)):
        layer, rope, config = _layer_and_rope(
            MoDConfig(
                routed_layers="all",
                routing="topk",
                capacity=40 / 128,
                compact_length_multiple=multiple,
            ),
            seq,
        )
        seen = []
        layer.mlp.register_forward_hook(lambda m, args, out, s=seen: s.append(args[0].shape[0]))
        with torch.no_grad():
            layer(
                hidden_states=torch.randn(seq, batch, config.hidden_size, device=DEVICE),
                rotary_pos_emb=rope,
            )
        assert seen == [expected], multiple
    assert MoDConfig().compact_length_multiple == 64


def test_compact_length_is_capped_at_the_sequence_length(mcore):
    from megatron_mod.dispatcher import MoDTokenDispatcher

    dispatcher = MoDTokenDispatcher(pad_to_multiple=64)
    kept = torch.tensor([10, 30], device=DEVICE)
    assert dispatcher.compact_length(kept, seq_len=48) == 48
    assert dispatcher.compact_length(torch.tensor([0, 0], device=DEVICE), seq_len=48) == 48
    assert dispatcher.compact_length(torch.tensor([0, 0], device=DEVICE), seq_len=256) == 64


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("fp8", "hybrid", "fp8"),
        ("cuda_graph_impl", "local", "CUDA graphs"),
        ("enable_cuda_graph", True, "CUDA graphs"),
        ("tp_comm_overlap", True, "tp_comm_overlap"),
        ("mtp_num_layers", 1, "multi-token prediction"),
        ("context_parallel_size", 2, "context_parallel_size"),
    ],
)
def test_unsupported_megatron_features_are_refused_clearly(mcore, field, value, message):
    from megatron.core.transformer.spec_utils import build_module

    from megatron_mod.config import MoDConfig
    from megatron_mod.models import llama_config
    from megatron_mod.specs import get_mod_layer_spec

    config = llama_config("tiny")
    setattr(config, field, value)  # set after validation: some need a GPU stack to validate
    with pytest.raises(ValueError, match=message):
        build_module(
            get_mod_layer_spec(MoDConfig(routed_layers="all")), config=config, layer_number=1
        )


# ------------------------------------------------------------------ activation recomputation


@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_metrics_are_recorded_once_per_micro_batch_under_recomputation(mcore, granularity):
    from megatron_mod.config import MoDConfig
    from megatron_mod.metrics import get_metrics_tracker

    overrides = {"recompute_granularity": granularity}
    if granularity == "full":
        overrides.update(recompute_method="uniform", recompute_num_layers=1)
    model = _model(MoDConfig(routed_layers="all", threshold=0.3), **overrides)
    model.train()
    tracker = get_metrics_tracker()
    tracker.clear()
    tokens, positions = _tokens(2, 16)
    loss = model(tokens, positions, None, labels=tokens).float().mean()
    loss.backward()
    assert sorted(tracker._counts) == list(range(model.config.num_layers))
    assert set(tracker._counts.values()) == {1}
    tracker.clear()


# ------------------------------------------------------------------ the device guard itself


def test_device_guard_refuses_a_host_tensor_in_a_collective(mcore):
    from megatron_mod import platform
    from megatron_mod.device_guard import HostTensorError

    with pytest.raises(HostTensorError, match="all_reduce got a host tensor"):
        torch.distributed.all_reduce(torch.zeros(1))
    torch.distributed.all_reduce(torch.zeros(1, device=platform.device()))
    moved = torch.ones(3).to(platform.device())
    torch.distributed.all_reduce(moved)


def test_device_guard_refuses_host_tokens_into_a_megatron_model(mcore):
    from megatron_mod import platform
    from megatron_mod.config import MoDConfig
    from megatron_mod.device_guard import HostTensorError

    model = _model(MoDConfig())
    tokens = torch.randint(0, VOCAB, (2, 8))
    positions = torch.arange(8)[None].expand(2, -1)
    with pytest.raises(HostTensorError, match="embedding combines a host tensor"):
        model(tokens, positions, None)
    device = platform.device()
    model(tokens.to(device), positions.to(device), None)


def test_device_guard_allows_host_scalars_and_indexing(mcore):
    from megatron_mod.config import MoDConfig

    model = _model(MoDConfig())
    weight = model.embedding.word_embeddings.weight
    with torch.no_grad():
        (weight * torch.tensor(2.0)).sum()  # 0-dim host tensors are scalars on a GPU too
        weight[torch.tensor([0, 3])].sum()  # indexing with host indices is legal on a GPU


# ------------------------------------------------------------------ CPU patches are reversible


def test_cpu_patches_are_undone_by_destroy_and_reapplied_by_initialize():
    """Run in a child process: destroying the session's megatron state would end this one's."""
    import subprocess
    import sys

    from tests.helpers.subprocess_utils import subprocess_env

    script = """
import torch
from megatron.core.tensor_parallel import random as mcore_random
from megatron_mod import platform

original = torch.cuda.current_device
original_tracker_flag = mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED
platform.initialize(tp=1, pp=1)
assert torch.cuda.current_device is not original
assert torch._C._len_torch_function_stack() >= 1
platform.destroy()
assert torch.cuda.current_device is original
assert mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED == original_tracker_flag
assert torch._C._len_torch_function_stack() == 0
platform.initialize(tp=1, pp=1)  # and once more, from scratch
from megatron_mod.models import build_gpt_model, llama_config
model = build_gpt_model(llama_config("tiny"), None, vocab_size=64, max_seq_len=16)
tokens = torch.zeros(1, 8, dtype=torch.long, device=platform.device())
model(tokens, torch.arange(8, device=platform.device())[None], None)
platform.destroy()
print("reversible")
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0 and "reversible" in proc.stdout, proc.stderr[-3000:]


def test_device_guard_covers_megatrons_collectives_bound_at_import(mcore):
    """megatron binds all_gather_into_tensor / reduce_scatter_tensor to its own names at import
    (SP gathers, DDP buckets): a host tensor through those names is refused too."""
    from megatron.core.distributed import param_and_grad_buffer
    from megatron.core.tensor_parallel import layers, mappings

    from megatron_mod.device_guard import HostTensorError, enabled

    with enabled():
        for module in (mappings, layers, param_and_grad_buffer):
            # Both host: no device mixing to trip over, only the collective's own check.
            host, out = torch.zeros(4), torch.zeros(4)
            with pytest.raises(HostTensorError, match="torch.distributed"):
                module.dist_all_gather_func(out, host)
            with pytest.raises(HostTensorError, match="torch.distributed"):
                module.dist_reduce_scatter_func(out, host)
