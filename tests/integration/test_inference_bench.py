"""MoD KV cache memory (allocated vs stored) and ``benchmarks/bench_inference.py`` at tiny size.

The cache's bytes are counted here straight from its tensors (not through its own accounting
methods), and the dense reference is ``transformers``' own ``DynamicCache`` filled by the stock
``LlamaForCausalLM``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from megatron_mod.hf.configuration_llama_mod import LlamaModConfig
from megatron_mod.hf.modeling_llama_mod import LlamaModCache, LlamaModForCausalLM
from tests.helpers.subprocess_utils import REPO
from tests.helpers.tiny_llama import (
    TINY_VOCAB,
    save_remote_code_dir,
    tiny_hf_config_kwargs,
)

VOCAB = TINY_VOCAB
CHUNK = 64  # the cache's growth unit (slots); the bound below allows one per layer
BASE = tiny_hf_config_kwargs(max_position_embeddings=2048)


# Small CPU models run faster (and steadier) on one thread.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(router_bias: float) -> LlamaModForCausalLM:
    torch.manual_seed(0)
    model = LlamaModForCausalLM(LlamaModConfig(**BASE, mod_routed_layers="every_other")).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "router.weight" in name:
                param.normal_(0.0, 0.2)
            elif "router.bias" in name:
                param.fill_(router_bias)
            elif "embed" in name or "lm_head" in name:
                param.normal_(0.0, 1.0)
    return model


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _allocated(cache: LlamaModCache, layer: int) -> int:
    return _tensor_bytes([cache.keys[layer], cache.values[layer], cache.positions[layer]])


def _slot_bytes(cache: LlamaModCache, layer: int) -> int:
    """Bytes of one stored token in one sequence: its key, value and position id."""
    k, v, pos = cache.keys[layer], cache.values[layer], cache.positions[layer]
    return k.shape[1] * k.shape[3] * (k.element_size() + v.element_size()) + pos.element_size()


def _prefill_and_decode(model, ids: torch.Tensor, steps: int) -> LlamaModCache:
    """Greedy decode with the cache (one token per step), as generate() drives it."""
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache = out.past_key_values
        for _ in range(steps):
            nxt = out.logits[:, -1:].argmax(-1)
            out = model(nxt, past_key_values=cache, use_cache=True)
    return cache


@pytest.mark.parametrize("router_bias", [0.0, 30.0], ids=["routed", "all-kept"])
def test_cache_allocates_at_most_one_chunk_beyond_what_it_stores(router_bias):
    # 300-token prompt then 40 decode steps: growing by doubling would allocate 640 slots per
    # layer for ~340 stored tokens; the cache may hold at most 64 slots per layer unused.
    model = _model(router_bias)
    ids = torch.randint(1, VOCAB, (1, 300), generator=torch.Generator().manual_seed(1))
    cache = _prefill_and_decode(model, ids, steps=40)
    total_allocated = total_stored = 0
    for layer in range(model.config.num_hidden_layers):
        stored_tokens = int(cache.lengths[layer].sum())
        slot = _slot_bytes(cache, layer)
        allocated = _allocated(cache, layer)
        assert allocated <= stored_tokens * slot + CHUNK * slot, (
            f"layer {layer}: allocated {allocated} B for {stored_tokens} stored tokens "
            f"({stored_tokens * slot} B)"
        )
        total_allocated += allocated
        total_stored += stored_tokens * slot
    assert cache.stored_bytes() == total_stored
    assert total_allocated <= cache.allocated_bytes() <= total_allocated + 1024
    if router_bias == 0.0:  # routed layers really store fewer tokens than dense ones
        routed = model.config.mod_routed_layers
        assert all(int(cache.lengths[i].sum()) < 340 for i in routed)
        assert all(int(cache.lengths[i].sum()) == 340 for i in (0, 2))


def test_all_kept_cache_allocates_within_one_chunk_of_transformers_dynamic_cache():
    # Every token kept (bias +30): the MoD cache stores what transformers' DynamicCache stores
    # for the stock model with the same weights, and allocates at most one chunk more per layer
    # (plus the 8-byte position id of each token).
    from transformers import LlamaConfig, LlamaForCausalLM

    model = _model(router_bias=30.0)
    stock = LlamaForCausalLM(LlamaConfig(**BASE)).eval()
    state = {k: v for k, v in model.state_dict().items() if ".router." not in k}
    stock.load_state_dict(state, strict=True)
    ids = torch.randint(1, VOCAB, (2, 200), generator=torch.Generator().manual_seed(2))
    cache = _prefill_and_decode(model, ids, steps=70)
    with torch.no_grad():
        out = stock(ids, use_cache=True)
        dense = out.past_key_values
        for _ in range(70):
            out = stock(out.logits[:, -1:].argmax(-1), past_key_values=dense, use_cache=True)
    if hasattr(dense, "layers"):
        dense_kv = [(layer.keys, layer.values) for layer in dense.layers]
    else:  # older transformers
        dense_kv = list(zip(dense.key_cache, dense.value_cache))
    for layer, (k, v) in enumerate(dense_kv):
        assert k.shape[2] == 270
        dense_bytes = _tensor_bytes([k, v])
        kv_allocated = _tensor_bytes([cache.keys[layer], cache.values[layer]])
        per_slot = 2 * k.shape[1] * k.shape[3] * k.element_size()
        assert dense_bytes <= kv_allocated <= dense_bytes + ids.shape[0] * CHUNK * per_slot


def test_batched_cache_allocates_at_most_the_longest_sequence_plus_one_chunk():
    # Sequences of one batch keep different numbers of tokens; each layer's capacity is the
    # longest sequence's count plus at most one chunk, never doubled.
    model = _model(router_bias=0.0)
    ids = torch.randint(1, VOCAB, (3, 257), generator=torch.Generator().manual_seed(3))
    cache = _prefill_and_decode(model, ids, steps=66)
    for layer in range(model.config.num_hidden_layers):
        longest = int(cache.lengths[layer].max())
        capacity = cache.keys[layer].shape[2]
        assert longest <= capacity < longest + CHUNK, (layer, longest, capacity)


def test_bench_inference_runs_at_tiny_size(tmp_path):
    # The whole benchmark on the random 4-layer model: calibrated variants plus a "trained" export
    # loaded with trust_remote_code; every row's c_eff follows from the calibration and the
    # cached bytes follow from c_eff.
    trained = LlamaModForCausalLM(
        LlamaModConfig(**{**BASE, "vocab_size": 256}, mod_routed_layers=[1, 3])
    ).eval()
    save_remote_code_dir(trained, tmp_path / "trained")
    out = tmp_path / "results"
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "bench_inference.py"),
        "--model", "tiny", "--contexts", "64,96", "--batches", "1,2", "--new-tokens", "3",
        "--rounds", "1", "--kept", "0.25,1", "--skipped-kv-kept", "0.25",
        "--calib-tokens", "256", "--threads", "1",
        "--max-tokens", "128",
        "--trained", str(tmp_path / "trained"), "--out-dir", str(out),
        "--save-calibrated", str(tmp_path / "calibrated"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| ctx | batch | variant |" in proc.stdout
    (json_path,) = out.glob("bench_inference_tiny_*.json")
    assert (out / (json_path.stem + ".png")).stat().st_size > 10_000
    result = json.loads(json_path.read_text())
    rows = result["rows"]
    # 96 x 2 tokens exceeds --max-tokens 128: that pair is skipped.
    assert {(r["context"], r["batch"]) for r in rows} == {(64, 1), (64, 2), (96, 1)}
    assert {r["variant"] for r in rows} == {
        "kept 0.25", "kept 1", "kept 0.25 skipped K/V", "trained trained p=0.5"
    }  # fmt: skip
    # --save-calibrated wrote the first variant as an export that transformers loads.
    from transformers import AutoModelForCausalLM

    calibrated = AutoModelForCausalLM.from_pretrained(
        tmp_path / "calibrated", trust_remote_code=True
    )
    for layer, bias in result["calibrated_biases"]["0.25"].items():
        router = calibrated.model.layers[int(layer)].router
        assert router.bias.detach().item() == pytest.approx(bias)
    per_slot_kv = 2 * 2 * 8 * 4  # K and V, 2 KV heads x head dim 8, fp32
    for r in rows:
        if r["variant"] == "kept 1":  # bias set below every token's logit: all computed
            assert r["c_eff_prefill"] == r["c_eff_decode"] == 1.0
        elif r["variant"].startswith("kept 0.25"):  # two dense + two routed layers at ~0.25
            assert abs(r["c_eff_prefill"] - (2 + 2 * 0.25) / 4) < 0.1, r
        # Skipped tokens' K/V are stored too: the cache holds every token, as dense does.
        assert r["skipped_kv"] == r["variant"].endswith("skipped K/V")
        if r["variant"].startswith("kept 0.25"):
            assert (r["ideal_kv"] == 1.0) == r["skipped_kv"], r
        # The MoD cache holds exactly the computed tokens (plus an 8-byte position each).
        assert r["kv_stored_ratio"] == pytest.approx(
            r["ideal_kv"] * per_slot_kv / (per_slot_kv + 8), rel=2e-3
        )
        assert r["dense_kv_bytes"] == 4 * r["batch"] * (r["context"] + 3) * per_slot_kv
        assert r["prefill_speedup"] > 0 and r["decode_speedup"] > 0
        # A decode step runs a layer if any row keeps its token there: with one row exactly the
        # kept steps, with two at least as many.
        if r["batch"] == 1:
            assert r["c_exec_decode"] == pytest.approx(r["c_eff_decode"])
        else:
            assert r["c_exec_decode"] >= r["c_eff_decode"] - 1e-9
