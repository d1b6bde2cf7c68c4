"""The HF MoD model (megatron_mod/hf/modeling_llama_mod.py) against independent references.

References: stock ``transformers.LlamaForCausalLM`` (p = 0, straight-through), a slow per-sequence
re-implementation of the routing that runs the stock ``LlamaDecoderLayer`` (eager attention) on
each layer's compact kept-token sequence, hand-computed router decisions, and greedy decoding by
full recomputation. Models are tiny and random (hidden 64, 4 layers, 8 heads / 2 KV heads).
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_mod.hf.configuration_llama_mod import LlamaModConfig
from megatron_mod.hf.modeling_llama_mod import LlamaModCache, LlamaModForCausalLM
from tests.helpers.tiny_llama import (
    TINY_VOCAB,
    save_remote_code_dir,
    tiny_hf_config_kwargs,
)

VOCAB = TINY_VOCAB
BASE = tiny_hf_config_kwargs()


# Small CPU models run faster (and steadier) on one thread.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(seed=0, router_std=0.2, router_bias=0.0, **mod) -> LlamaModForCausalLM:
    """A random MoD model whose routers skip roughly half of the tokens (bias 0, p = 0.5)."""
    torch.manual_seed(seed)
    model = LlamaModForCausalLM(LlamaModConfig(**BASE, **mod)).eval()
    with torch.no_grad():  # non-trivial norms and O(1) embeddings, as in a trained model
        for name, param in model.named_parameters():
            if "router.weight" in name:
                param.normal_(0.0, router_std)
            elif "router.bias" in name:
                param.fill_(router_bias)
            elif "norm" in name:
                param.normal_(1.0, 0.2)
            elif "embed" in name or "lm_head" in name:
                param.normal_(0.0, 1.0)
    return model


def _stock(model: LlamaModForCausalLM, attn="eager"):
    """transformers' own LlamaForCausalLM with the MoD model's weights (routers dropped)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**BASE)
    config._attn_implementation = attn
    stock = LlamaForCausalLM(config).eval()
    state = {k: v for k, v in model.state_dict().items() if ".router." not in k}
    stock.load_state_dict(state, strict=True)
    return stock


def _tokens(lengths, seed=1, total=None):
    """Left-padded batch: (input_ids, attention_mask) with the given real lengths."""
    total = total or max(lengths)
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), total, dtype=torch.long)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, total - n :] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[b, total - n :] = 1
    return ids, mask


def _reference(model: LlamaModForCausalLM, ids: torch.Tensor, mask: torch.Tensor):
    """Slow MoD forward, one sequence at a time, on stock transformers layers.

    For each layer: router on the residual stream, select kept tokens, run the stock
    LlamaDecoderLayer on just that compact sequence (original position ids, eager causal
    attention), combine with the gate. Returns (logits [b, s, V] on real positions, zeros on
    padding) and {layer: [b, s] bool keep}.
    """
    cfg = model.config
    stock = _stock(model)
    routed = set(cfg.mod_routed_layers)
    logits = torch.zeros(*ids.shape, VOCAB)
    keeps = {i: torch.zeros(ids.shape, dtype=torch.bool) for i in routed}
    for b in range(ids.shape[0]):
        real = mask[b].bool()
        cols = real.nonzero().squeeze(1)
        tokens = ids[b, cols]
        pos = torch.arange(len(tokens))
        h = stock.model.embed_tokens(tokens)
        for i, layer in enumerate(stock.model.layers):
            if i in routed:
                router = model.model.layers[i].router
                logit = h.float() @ router.weight[0] + router.bias[0]
                gate = torch.sigmoid(logit)
                if cfg.mod_routing == "threshold":
                    keep = gate >= cfg.mod_threshold
                else:
                    k = min(len(h), max(1, math.ceil(cfg.mod_capacity * len(h))))
                    keep = torch.zeros(len(h), dtype=torch.bool)
                    keep[torch.topk(logit, k).indices] = True
                keeps[i][b, cols] = keep
            else:
                keep = torch.ones(len(h), dtype=torch.bool)
            idx = keep.nonzero().squeeze(1)
            if len(idx) == 0:
                continue
            # mod_skipped_kv: a token's K/V depend only on its own input, so "skipped tokens
            # still provide K/V" is the stock layer on every token, skipped outputs discarded.
            run = torch.arange(len(h)) if cfg.mod_skipped_kv and i in routed else idx
            x = h[run][None]
            n = len(run)
            causal = torch.full((n, n), torch.finfo(x.dtype).min).triu(1)[None, None]
            cos_sin = stock.model.rotary_emb(x, pos[run][None])
            out = layer(
                x, attention_mask=causal, position_ids=pos[run][None], position_embeddings=cos_sin
            )
            out = (out[0] if isinstance(out, tuple) else out)[0]
            if len(run) != len(idx):
                out = out[idx]
            if i not in routed:
                new = out
            elif cfg.mod_gate == "scale":
                new = h[idx] + gate[idx, None] * (out - h[idx])
            else:
                new = out
            h = h.clone()
            h[idx] = new
        logits[b, cols] = stock.lm_head(stock.model.norm(h))
    return logits, keeps


def _real_max_diff(a, b, mask):
    return float((a - b).abs()[mask.bool()].max())


# --------------------------------------------------------------------------------- forward


def test_p0_straight_through_equals_stock_llama():
    model = _model(mod_threshold=0.0, mod_gate="straight_through", mod_routed_layers="all")
    stock = _stock(model, attn="sdpa")
    ids, mask = _tokens([12, 12])
    with torch.no_grad():
        got = model(ids).logits
        want = stock(ids).logits
        assert (got - want).abs().max() <= 1e-5
        # Left padding: real positions equal stock Llama given the same mask and position ids.
        ids, mask = _tokens([12, 7])
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(ids, attention_mask=mask, output_router_stats=True)
        want = stock(ids, attention_mask=mask, position_ids=pos).logits
    assert _real_max_diff(out.logits, want, mask) <= 1e-5
    assert all(s["kept_fraction"] == 1.0 and s["tokens"] == 19 for s in out.router_stats.values())


@pytest.mark.parametrize("gate", ["scale", "straight_through"])
def test_routing_matches_slow_reference(gate):
    model = _model(seed=2, mod_gate=gate, mod_routed_layers=[0, 1, 3])
    ids, mask = _tokens([16, 11, 5], seed=3)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_router_stats=True)
        ref_logits, ref_keep = _reference(model, ids, mask)
        stock = _stock(model)(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(0))
    assert _real_max_diff(out.logits, ref_logits, mask) <= 1e-5
    # Routing changed the output, and really skips tokens.
    assert _real_max_diff(out.logits, stock.logits, mask) > 1e-2
    real = mask.bool()
    for i, stats in out.router_stats.items():
        assert torch.equal(stats["keep"], ref_keep[i])
        assert not stats["keep"][~real].any()  # padding is never kept
        assert stats["kept_fraction"] == pytest.approx(float(ref_keep[i].sum()) / int(real.sum()))
        assert 0.15 < stats["kept_fraction"] < 0.85, (i, stats["kept_fraction"])
    # Layer 0 by hand: its input is the embedding, so the router decision is w . E[x] + b.
    emb = model.model.embed_tokens.weight[ids].detach()
    router = model.model.layers[0].router
    g = torch.sigmoid(emb @ router.weight[0].detach() + router.bias[0].detach())
    assert out.router_stats[0]["kept_fraction"] == float(((g >= 0.5) & real).sum()) / 32
    assert out.router_stats[0]["mean_gate"] == pytest.approx(float(g[real].mean()), abs=1e-6)


def test_only_kept_tokens_are_computed():
    model = _model(seed=2, mod_routed_layers=[1])
    ids, mask = _tokens([16, 9], seed=3)
    seen = {}
    hooks = [
        model.model.layers[i].self_attn.q_proj.register_forward_hook(
            lambda mod, args, out, i=i: seen.__setitem__(i, args[0].shape[:2])
        )
        for i in (0, 1)
    ]
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_router_stats=True)
    for h in hooks:
        h.remove()
    kept = out.router_stats[1]["keep"].sum(dim=1)
    assert seen[1] == (2, int(kept.max())) and int(kept.max()) < 16  # compact batch only
    assert seen[0] == (2, 16)  # dense layer: the real tokens (the longest sequence has no padding)


def test_threshold_routing_is_causal():
    model = _model(seed=4, mod_threshold=0.5)
    ids, _ = _tokens([20, 20], seed=5)
    with torch.no_grad():
        full = model(ids, output_router_stats=True)
        assert 0.15 < full.router_stats[1]["kept_fraction"] < 0.85
        for k in (1, 7, 13):
            prefix = model(ids[:, :k]).logits
            assert (prefix - full.logits[:, :k]).abs().max() <= 1e-5


def test_threshold_changes_at_run_time_and_is_validated():
    model = _model(seed=2, mod_routed_layers="all")
    ids, mask = _tokens([16, 10], seed=3)
    with torch.no_grad():
        half = model(ids, attention_mask=mask, output_router_stats=True).router_stats
        model.set_mod_threshold(0.0)
        everything = model(ids, attention_mask=mask, output_router_stats=True).router_stats
        model.set_mod_threshold(1.0)
        nothing = model(ids, attention_mask=mask).logits
        stock_embed = model.lm_head(model.model.norm(model.model.embed_tokens(ids)))
    assert all(s["kept_fraction"] == 1.0 for s in everything.values())
    assert half[0]["kept_fraction"] < 1.0
    # p = 1 keeps only tokens with g == 1 exactly (none here): every layer is the identity.
    assert _real_max_diff(nothing, stock_embed, mask) <= 1e-6
    with pytest.raises(ValueError, match="mod_threshold"):
        model.set_mod_threshold(1.5)
    assert model.config.mod_threshold == 1.0


@pytest.mark.parametrize("gate", ["scale", "straight_through"])
def test_labels_loss_and_router_gradient(gate):
    model = _model(seed=2, mod_gate=gate, mod_routed_layers=[1, 3]).train()
    ids, mask = _tokens([12, 7], seed=3)
    labels = ids.masked_fill(mask == 0, -100)
    out = model(ids, attention_mask=mask, labels=labels)
    logits = out.logits[:, :-1][mask[:, 1:].bool()]
    want = torch.nn.functional.cross_entropy(logits, ids[:, 1:][mask[:, 1:].bool()])
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-6)
    out.loss.backward()
    for i in (1, 3):
        grad = model.model.layers[i].router.weight.grad
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


# ------------------------------------------------------------------------------------ top-k


def test_topk_keeps_ceil_c_s_per_sequence_and_decodes_with_its_threshold():
    model = _model(seed=6, mod_routing="topk", mod_capacity=0.3, mod_routed_layers=[1, 3])
    ids, mask = _tokens([12, 5, 1], seed=7)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_router_stats=True, use_cache=True)
        ref_logits, ref_keep = _reference(model, ids, mask)
    assert _real_max_diff(out.logits, ref_logits, mask) <= 1e-5
    expected = torch.tensor([4, 2, 1])  # ceil(0.3 * S) for the real lengths S = 12, 5, 1
    cache = out.past_key_values
    for i in (1, 3):
        assert torch.equal(out.router_stats[i]["keep"], ref_keep[i])
        assert torch.equal(out.router_stats[i]["keep"].sum(dim=1), expected)
        assert torch.equal(cache.kept_counts(i), expected)
    # Decoding with a cache needs the decode threshold, and says which key to set.
    step = torch.tensor([[5], [6], [7]])
    step_mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
    with pytest.raises(ValueError, match="mod_topk_decode_threshold"):
        model(step, attention_mask=step_mask, past_key_values=cache, use_cache=True)
    model.config.mod_topk_decode_threshold = 0.5
    single = _model(seed=6, mod_routing="topk", mod_capacity=0.3, mod_routed_layers=[1, 3])
    single.config.mod_topk_decode_threshold = 0.5
    ids1, mask1 = ids[:1], mask[:1]
    with torch.no_grad():
        cache1 = single(ids1, attention_mask=mask1, use_cache=True).past_key_values
        decisions = 0
        for t in range(6):
            mask1 = torch.cat([mask1, torch.ones(1, 1, dtype=torch.long)], dim=1)
            step = single(
                torch.tensor([[10 + t]]),
                attention_mask=mask1,
                past_key_values=cache1,
                use_cache=True,
                output_router_stats=True,
            )
            for i in (1, 3):
                s = step.router_stats[i]  # one token: mean_gate is its gate
                assert s["kept_tokens"] == int(s["mean_gate"] >= 0.5)
                decisions += s["kept_tokens"]
    assert 0 < decisions < 12
    assert int(cache1.kept_counts(1)[0] + cache1.kept_counts(3)[0]) == 2 * 4 + decisions


# ---------------------------------------------------------------------------- cache, generate


def _greedy_by_recompute(model, ids, mask, steps):
    """Greedy decoding without a cache: the whole sequence is recomputed at every step."""
    ids, mask, all_logits = ids.clone(), mask.clone(), []
    for _ in range(steps):
        logits = model(ids, attention_mask=mask, use_cache=False).logits[:, -1]
        all_logits.append(logits)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids, torch.stack(all_logits, dim=1)


def test_greedy_generate_with_mod_cache_equals_recompute_and_cache_holds_kept_tokens():
    model = _model(seed=8, mod_routed_layers=[1, 2, 3])
    ids, mask = _tokens([9, 4], seed=9)
    steps = 10
    with torch.no_grad():
        gen = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=steps,
            do_sample=False,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_logits=True,
        )
        want, want_logits = _greedy_by_recompute(model, ids, mask, steps)
        assert torch.equal(gen.sequences, want)
        assert (torch.stack(gen.logits, dim=1) - want_logits).abs().max() <= 1e-4
        cache = gen.past_key_values
        assert isinstance(cache, LlamaModCache)
        # The cache has seen the prompt and every generated token but the last.
        fed = gen.sequences[:, :-1]
        fed_mask = torch.cat([mask, torch.ones(2, steps - 1, dtype=torch.long)], dim=1)
        stats = model(fed, attention_mask=fed_mask, output_router_stats=True).router_stats
    assert cache.get_seq_length() == fed.shape[1]
    positions = (fed_mask.cumsum(-1) - 1).clamp(min=0)
    for i in range(4):
        keep = stats[i]["keep"] if i in stats else fed_mask.bool()
        assert torch.equal(cache.kept_counts(i), keep.sum(dim=1)), i
        for b in range(2):
            assert torch.equal(cache.layer_positions(i, b), positions[b][keep[b]]), (i, b)
    counts = torch.stack([cache.kept_counts(i) for i in (1, 2, 3)])
    assert (counts < torch.tensor([[9 + steps - 1], [4 + steps - 1]]).T).all()  # tokens skipped


def test_generate_feeds_its_cache_back_one_token_per_step():
    """generate() must hand the MoD cache back to every step, whatever transformers calls it.

    Recomputing the whole sequence each step gives the same tokens, so only the inputs tell.
    """
    model = _model(seed=8, mod_routed_layers=[1, 2, 3])
    ids, mask = _tokens([9, 4], seed=9)
    fed, forward = [], model.forward

    def recording_forward(*args, **kwargs):
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        fed.append((kwargs["input_ids"].shape[1], type(cache).__name__))
        return forward(*args, **kwargs)

    model.forward = recording_forward
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert fed[0][0] == ids.shape[1]
    assert fed[1:] == [(1, "LlamaModCache")] * 3, fed


def test_a_decode_step_syncs_the_host_at_most_once_per_layer():
    """Each layer reads its kept counts once; the cache plans from its host copy of lengths."""
    from tests.helpers.host_syncs import HostSyncCounter

    model = _model(seed=8, mod_routed_layers=[1, 2, 3])
    ids, mask = _tokens([9, 4], seed=9)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        cache = out.past_key_values
        for step in range(4):
            token = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
            with HostSyncCounter() as counter:
                out = model(token, attention_mask=mask, past_key_values=cache, use_cache=True)
            assert counter.count <= model.config.num_hidden_layers, (step, counter.calls)
    # Counts and positions come back on the cache's device whether a layer stored anything.
    empty = LlamaModCache(2)
    empty._begin(3, torch.device("cpu"))
    assert empty.kept_counts(0).device == empty.real_tokens.device
    assert empty.layer_positions(0, 0).device == empty.real_tokens.device
    assert cache.kept_counts(1).device == cache.real_tokens.device


def test_p0_generate_equals_stock_llama_generate_greedy_and_beam():
    model = _model(seed=8, mod_threshold=0.0, mod_gate="straight_through", mod_routed_layers="all")
    stock = _stock(model, attn="sdpa")
    ids, mask = _tokens([9, 4], seed=9)
    for beams in (1, 3):
        kwargs = dict(attention_mask=mask, max_new_tokens=6, num_beams=beams, do_sample=False)
        with torch.no_grad():
            got = model.generate(ids, pad_token_id=0, **kwargs)
            want = stock.generate(ids, pad_token_id=0, **kwargs)
        assert torch.equal(got, want), beams


def test_sampling_generate_is_seeded_and_valid():
    model = _model(seed=10)
    ids, mask = _tokens([6, 3], seed=11)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        with torch.no_grad():
            runs.append(
                model.generate(
                    ids,
                    attention_mask=mask,
                    max_new_tokens=8,
                    do_sample=True,
                    top_k=0,
                    temperature=1.5,
                    pad_token_id=0,
                )
            )
    assert torch.equal(runs[0], runs[1])
    new = runs[0][:, ids.shape[1] :]
    assert new.shape == (2, 8) and ((new >= 0) & (new < VOCAB)).all()
    assert torch.equal(runs[0][:, : ids.shape[1]], ids)


# -------------------------------------------------------------------------- save and load


def test_save_and_load_with_trust_remote_code(tmp_path):
    import transformers
    from transformers import AutoModelForCausalLM

    model = _model(seed=12, mod_routed_layers=[1, 3])
    save_remote_code_dir(model, tmp_path / "m")
    ids, mask = _tokens([12, 8], seed=13)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True).eval()
    assert type(loaded).__name__ == "LlamaModForCausalLM"
    if transformers.__version__.startswith("4."):
        # transformers 5 prefers a class registered in this process (megatron_mod registers
        # llama_mod) over the copied file; tests/unit/hf/test_families.py loads exports in a
        # clean process.
        assert type(loaded).__module__.startswith("transformers_modules")  # the copied file
    with torch.no_grad():
        want = model(ids, attention_mask=mask, output_router_stats=True)
        got = loaded(ids, attention_mask=mask, output_router_stats=True)
    assert torch.equal(got.logits, want.logits)
    # p at load time.
    low = AutoModelForCausalLM.from_pretrained(
        tmp_path / "m", trust_remote_code=True, mod_threshold=0.3
    ).eval()
    assert low.config.mod_threshold == 0.3
    with torch.no_grad():
        low_stats = low(ids, attention_mask=mask, output_router_stats=True).router_stats
    assert low_stats[1]["kept_fraction"] > want.router_stats[1]["kept_fraction"]
    with pytest.raises(ValueError, match="mod_threshold"):
        AutoModelForCausalLM.from_pretrained(
            tmp_path / "m", trust_remote_code=True, mod_threshold=3
        )
    # bf16: routers stay fp32 (and under .to(bfloat16) too); the rest is bf16.
    bf16 = AutoModelForCausalLM.from_pretrained(
        tmp_path / "m", trust_remote_code=True, torch_dtype=torch.bfloat16
    ).eval()
    params = dict(bf16.named_parameters())
    assert params["model.layers.1.router.weight"].dtype == torch.float32
    assert params["model.layers.3.router.bias"].dtype == torch.float32
    assert params["model.layers.1.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert torch.equal(params["model.layers.1.router.weight"], model.model.layers[1].router.weight)
    cast = _model(seed=12, mod_routed_layers=[1, 3]).to(torch.bfloat16)
    assert cast.model.layers[1].router.weight.dtype == torch.float32
    with torch.no_grad():
        logits = bf16(ids, attention_mask=mask).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_register_llama_mod_with_auto_classes():
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_mod.hf import register_llama_mod

    register_llama_mod()
    register_llama_mod()  # idempotent
    config = AutoConfig.for_model("llama_mod", **BASE)
    assert isinstance(config, LlamaModConfig) and config.mod_routed_layers == [1, 3]
    assert type(AutoModelForCausalLM.from_config(config)) is LlamaModForCausalLM


# ------------------------------------------------------------------------------ bad config


@pytest.mark.parametrize(
    "key, value",
    [
        ("mod_routing", "random"),
        ("mod_threshold", 1.5),
        ("mod_threshold", "0.5"),
        ("mod_capacity", 0.0),
        ("mod_capacity", 1.2),
        ("mod_gate", "soft"),
        ("mod_routed_layers", [4]),
        ("mod_routed_layers", [1, 1]),
        ("mod_routed_layers", []),
        ("mod_routed_layers", "odd"),
        ("mod_topk_decode_threshold", -0.1),
    ],
)
def test_bad_config_values_name_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        LlamaModConfig(**BASE, **{key: value})


def test_config_defaults_and_routed_layer_forms():
    config = LlamaModConfig(**BASE)
    assert config.model_type == "llama_mod"
    assert config.mod_routing == "threshold" and config.mod_threshold == 0.5
    assert config.mod_capacity == 0.125
    assert config.mod_gate == "scale" and config.mod_topk_decode_threshold is None
    assert config.mod_routed_layers == [1, 3]
    assert LlamaModConfig(**BASE, mod_routed_layers="all").mod_routed_layers == [0, 1, 2, 3]
    assert LlamaModConfig(**BASE, mod_routed_layers="2,0").mod_routed_layers == [0, 2]
    again = LlamaModConfig.from_dict(config.to_dict())
    assert again.mod_routed_layers == [1, 3] and again.mod_threshold == 0.5


# ------------------------------------------------------------- gate, attention kernel, devices


def _gate_model(threshold: float) -> LlamaModForCausalLM:
    """Layer 0 routed with logit = 1000 * (embedding[:, 0]): token 5 has logit -1000 (its gate
    underflows to exactly 0 in fp32), every other token logit +10 (gate ~ 1)."""
    model = _model(
        seed=20, mod_gate="straight_through", mod_threshold=threshold, mod_routed_layers=[0]
    )
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 0.01
        emb[5, 0] = -1.0
        router = model.model.layers[0].router
        router.weight.zero_()
        router.weight[0, 0] = 1000.0
        router.bias.zero_()
    return model


def test_straight_through_is_exact_and_finite_when_a_gate_underflows():
    ids = torch.tensor([[5, 7, 9, 11, 13], [2, 4, 6, 8, 10]])
    # p = 0 keeps the token whose gate is exactly 0: the forward must still be the base model's
    # (g / sg(g) would give 0 / 0 = NaN here).
    model = _gate_model(threshold=0.0).train()
    out = model(ids, labels=ids, output_router_stats=True)
    assert out.router_stats[0]["kept_tokens"] == 10
    with torch.no_grad():
        want = _stock(model)(ids).logits
    assert torch.isfinite(out.logits).all()
    assert float((out.logits - want).abs().max()) < 1e-4
    out.loss.backward()
    grad = model.model.layers[0].router.weight.grad
    assert torch.isfinite(grad).all()
    # p = 0.5 skips that token; in a batch it then fills the padded slot of its sequence's compact
    # row, whose masked-out output must not send 0 * inf into the router gradient.
    model = _gate_model(threshold=0.5).train()
    out = model(ids, labels=ids, output_router_stats=True)
    assert out.router_stats[0]["kept_tokens"] == 9
    out.loss.backward()
    grad = model.model.layers[0].router.weight.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


class _SdpaCalls(torch.overrides.TorchFunctionMode):
    """Records how ``scaled_dot_product_attention`` is called (kernel-relevant arguments)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q, k = args[0], args[1]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            self.calls.append(
                dict(
                    masked=mask is not None,
                    gqa=bool(kwargs.get("enable_gqa", False)),
                    q_heads=q.shape[1],
                    kv_heads=k.shape[1],
                )
            )
        return func(*args, **kwargs)


def test_masked_attention_repeats_kv_instead_of_enable_gqa():
    """SDPA with enable_gqa=True and a mask runs PyTorch's slow math kernel: with a mask the
    model must hand SDPA repeated K/V, and use enable_gqa only without one."""
    model = _model(seed=21)
    ids, mask = _tokens([9, 4], seed=22)
    recorder = _SdpaCalls()
    with torch.no_grad(), recorder:
        out = model(ids, attention_mask=mask, use_cache=True)
        step = torch.tensor([[3], [4]])
        model(
            step,
            attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1),
            past_key_values=out.past_key_values,
        )
    masked = [c for c in recorder.calls if c["masked"]]
    assert masked, "a batched decode with unequal cache lengths needs a mask"
    for call in masked:
        assert not call["gqa"] and call["kv_heads"] == call["q_heads"], call
    for call in recorder.calls:
        if not call["masked"]:
            assert call["gqa"] and call["kv_heads"] < call["q_heads"], call


class _OnDevice(torch.Tensor):
    """A CPU tensor that reports the virtual device :class:`_VirtualGPUs` assigned to it."""


def _device_tag(device) -> int | None:
    device = torch.device(device)
    return device.index if device.type == "cpu" and device.index is not None else None


class _VirtualGPUs(torch.overrides.TorchFunctionMode):
    """Several "GPUs" on one CPU, with CUDA's rule that an op's tensors share one device.

    Tensors carry a virtual device index (``_vdev``) and report ``cpu:<index>`` as their device;
    an op on tensors of different indices (or a host tensor of rank > 0 with a device tensor)
    raises, as it would across GPUs. ``.to(device)`` and factory calls with ``device=`` give
    their result that device; other ops give their inputs'. The values are computed on the CPU
    unchanged, so results can be compared with an ordinary run.
    """

    _MOVES = (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_flatten, tree_map

        kwargs = kwargs or {}
        if getattr(func, "__self__", None) is torch.Tensor.device:  # the .device getter
            tag = getattr(args[0], "_vdev", None)
            return torch.device("cpu", tag) if tag is not None else torch.device("cpu")
        if func in self._MOVES:
            target = kwargs.get("device")
            for arg in args[1:]:
                if isinstance(arg, (str, torch.device)):
                    target = arg
                elif isinstance(arg, torch.Tensor):
                    target = arg.device
            if func is torch.Tensor.cpu:
                target = "cpu"
            tag = getattr(args[0], "_vdev", None) if target is None else _device_tag(target)
        elif kwargs.get("device") is not None:
            tag = _device_tag(kwargs["device"])
        else:
            flat, _ = tree_flatten((args, kwargs))
            tags = {
                getattr(t, "_vdev", None)
                for t in flat
                if isinstance(t, torch.Tensor) and (t.dim() > 0 or hasattr(t, "_vdev"))
            }
            if func is torch.Tensor.copy_:  # copies between devices are allowed
                tags = {getattr(args[0], "_vdev", None)}
            if len(tags) > 1:
                name = getattr(func, "__name__", str(func))
                raise RuntimeError(f"{name}: expected all tensors on one device, got {tags}")
            tag = next(iter(tags), None)
        out = func(*args, **kwargs)

        def place(t):
            if isinstance(t, torch.Tensor) and tag is not None:
                t = t if isinstance(t, _OnDevice) else t.as_subclass(_OnDevice)
                t._vdev = tag
            return t

        return tree_map(place, out)


def _place(module: torch.nn.Module, index: int) -> None:
    """Put a module's parameters and buffers on virtual GPU ``index``."""
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for name, t in store.items():
                if t is None:
                    continue
                moved = t.detach().as_subclass(_OnDevice)
                if isinstance(t, torch.nn.Parameter):
                    moved = torch.nn.Parameter(moved, requires_grad=t.requires_grad)
                moved._vdev = index
                store[name] = moved


def test_model_split_across_gpus_moves_masks_and_routing_to_each_layer():
    """device_map="auto" puts consecutive layers on different GPUs: the padding mask, positions
    and rotary tables made on the first GPU, and the residual stream, must follow each layer."""
    model = _model(seed=23, mod_routed_layers=[1, 2, 3])
    ids, mask = _tokens([10, 6], seed=24)
    step = torch.tensor([[3], [4]])
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    with torch.no_grad():
        want = model(ids, attention_mask=mask, use_cache=True)
        want_step = model(step, attention_mask=step_mask, past_key_values=want.past_key_values)
    # GPU 0: embeddings, rotary tables, layers 0-1; GPU 1: layers 2-3, final norm, head.
    for part in (model.model.embed_tokens, model.model.rotary_emb, *model.model.layers[:2]):
        _place(part, 0)
    for part in (*model.model.layers[2:], model.model.norm, model.lm_head):
        _place(part, 1)

    def on_gpu0(t):
        t = t.as_subclass(_OnDevice)
        t._vdev = 0
        return t

    with torch.no_grad(), _VirtualGPUs():
        got = model(on_gpu0(ids), attention_mask=on_gpu0(mask), use_cache=True)
        got_step = model(
            on_gpu0(step), attention_mask=on_gpu0(step_mask), past_key_values=got.past_key_values
        )
        assert got.logits.device == torch.device("cpu", 1)
    assert torch.equal(got.logits.as_subclass(torch.Tensor), want.logits)
    assert torch.equal(got_step.logits.as_subclass(torch.Tensor), want_step.logits)


# ------------------------------------------------------------------------------ skipped K/V


@pytest.mark.parametrize("gate", ["scale", "straight_through"])
def test_skipped_kv_matches_slow_reference_and_differs_from_kept_only_kv(gate):
    model = _model(seed=2, mod_gate=gate, mod_routed_layers=[0, 1, 3], mod_skipped_kv=True)
    ids, mask = _tokens([16, 11, 5], seed=3)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_router_stats=True)
        ref_logits, ref_keep = _reference(model, ids, mask)
        model.config.mod_skipped_kv = False
        kept_only = model(ids, attention_mask=mask).logits
    assert _real_max_diff(out.logits, ref_logits, mask) <= 1e-5
    assert _real_max_diff(out.logits, kept_only, mask) > 1e-2
    for i, stats in out.router_stats.items():
        assert torch.equal(stats["keep"], ref_keep[i])
        assert 0.15 < stats["kept_fraction"] < 0.85, (i, stats["kept_fraction"])


def test_skipped_kv_projects_keys_for_every_token_and_queries_for_kept_tokens():
    model = _model(seed=2, mod_routed_layers=[1], mod_skipped_kv=True)
    ids, mask = _tokens([16, 9], seed=3)
    seen = {}
    attn = model.model.layers[1].self_attn
    hooks = [
        module.register_forward_hook(
            lambda mod, args, out, name=name: seen.__setitem__(name, args[0].shape[:2])
        )
        for name, module in (("q", attn.q_proj), ("k", attn.k_proj), ("o", attn.o_proj))
    ]
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_router_stats=True)
    for h in hooks:
        h.remove()
    kept = out.router_stats[1]["keep"].sum(dim=1)
    assert int(kept.max()) < 16
    assert seen["q"] == seen["o"] == (2, int(kept.max()))
    assert seen["k"] == (2, 16)


def test_skipped_kv_generate_with_cache_equals_recompute_and_cache_holds_every_token():
    from tests.helpers.host_syncs import HostSyncCounter

    model = _model(seed=8, mod_routed_layers=[1, 2, 3], mod_skipped_kv=True)
    ids, mask = _tokens([9, 4], seed=9)
    steps = 10
    with torch.no_grad():
        gen = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=steps,
            do_sample=False,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_logits=True,
        )
        want, want_logits = _greedy_by_recompute(model, ids, mask, steps)
        fed = gen.sequences[:, :-1]
        fed_mask = torch.cat([mask, torch.ones(2, steps - 1, dtype=torch.long)], dim=1)
        stats = model(fed, attention_mask=fed_mask, output_router_stats=True).router_stats
        # Decoding reads the host once per layer, as with kept-only K/V.
        out = model(ids, attention_mask=mask, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        with HostSyncCounter() as counter:
            model(token, attention_mask=step_mask, past_key_values=out.past_key_values)
    assert torch.equal(gen.sequences, want)
    assert (torch.stack(gen.logits, dim=1) - want_logits).abs().max() <= 1e-4
    cache = gen.past_key_values
    positions = (fed_mask.cumsum(-1) - 1).clamp(min=0)
    for i in range(4):
        assert torch.equal(cache.kept_counts(i), fed_mask.sum(dim=1)), i
        for b in range(2):
            assert torch.equal(cache.layer_positions(i, b), positions[b][fed_mask[b].bool()])
    for i in (1, 2, 3):
        assert (stats[i]["keep"].sum(dim=1) < fed_mask.sum(dim=1)).all(), i  # tokens skipped
    assert counter.count <= model.config.num_hidden_layers, counter.calls
