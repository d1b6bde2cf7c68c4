"""HF LLaMA <-> megatron-mod conversion: mapping facts, round trips, parity, streaming, bad input.

The source model is a random tiny ``transformers.LlamaForCausalLM`` with the shape choices of the
real targets (GQA: 8 heads / 2 KV heads, 4 layers, hidden 64, untied embeddings) and a vocabulary
of 250 so that padding to 256 is exercised. Multi-rank loads (TP/PP 1-2) run under torchrun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_mod.config import MoDConfig
from megatron_mod.hf import mapping as M
from tests.helpers.subprocess_utils import DISTRIBUTED_SCRIPTS, REPO, run_script, subprocess_env
from tests.helpers.tiny_llama import TINY_LLAMA, save_bin_shards

DIST_SCRIPT = DISTRIBUTED_SCRIPTS / "convert_load_check.py"
VOCAB, PADDED = 250, 256
P0 = MoDConfig(gate="straight_through", threshold=0.0, routed_layers="all")
# Routers with a fixed random direction and bias 0: roughly half of the tokens skip each layer.
ROUTED = MoDConfig(threshold=0.5, routed_layers="all", router_init_std=2.0, router_init_bias=0.0)


def _dims(vocab=VOCAB, padded=PADDED) -> M.LlamaDims:
    return M.LlamaDims(4, 64, 8, 2, 8, 176, vocab, padded)


def _hf_config(**overrides):
    from transformers import LlamaConfig

    values = dict(vocab_size=VOCAB, **TINY_LLAMA, rope_theta=10000.0)
    values.update(overrides)
    return LlamaConfig(**values)


def _save_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(out)


def _make_hf(out: Path, seed=0, max_shard_size="60KB", **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(_hf_config(**overrides)).eval()
    with torch.no_grad():  # non-trivial norms, so a swapped norm would show
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.2)
            elif "embed" in name or "lm_head" in name:
                param.normal_(0.0, 1.0)
    model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    _save_tokenizer(out)
    return model


@pytest.fixture(scope="module")
def work(tmp_path_factory, mcore):
    """The HF source, reference logits, and the p=0 / routed Megatron checkpoints."""
    from megatron_mod.hf.convert import convert_hf_to_megatron

    root = tmp_path_factory.mktemp("convert")
    hf = _make_hf(root / "hf")
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
    torch.save(tokens, root / "tokens.pt")
    convert_hf_to_megatron(root / "hf", root / "ck_p0", tp=2, pp=2, mod_config=P0, progress=False)
    convert_hf_to_megatron(
        root / "hf", root / "ck_routed", tp=2, pp=1, mod_config=ROUTED, progress=False
    )
    return dict(root=root, hf=hf, tokens=tokens, ref=ref)


def _megatron_logits(ckpt, tokens, **kwargs):
    from megatron_mod.checkpointing import load_model_checkpoint
    from megatron_mod.layer import MoDTransformerLayer

    model, metadata = load_model_checkpoint(ckpt, **kwargs)
    model.eval()
    positions = torch.arange(tokens.shape[1])[None].expand(tokens.shape[0], -1)
    with torch.no_grad():
        logits = model(tokens, positions, None)
    kept = {
        m.global_layer_index: float(m.last_keep.float().mean())
        for m in model.modules()
        if isinstance(m, MoDTransformerLayer)
    }
    return logits, kept, metadata


# ------------------------------------------------------------------------------ mapping facts


def test_padded_vocab_size():
    assert M.padded_vocab_size(250, 1) == 256
    assert M.padded_vocab_size(250, 2) == 256
    assert M.padded_vocab_size(250, 4) == 512
    assert M.padded_vocab_size(32000, 1) == 32000
    assert M.padded_vocab_size(32000, 8) == 32768
    assert M.padded_vocab_size(256, 1) == 256


def test_qkv_is_fused_per_query_group_and_tp_splits_by_group():
    dims = _dims()
    hd, hpg = dims.head_dim, dims.heads_per_group
    q = torch.arange(64 * 64, dtype=torch.float32).reshape(64, 64)
    k = -torch.arange(16 * 64, dtype=torch.float32).reshape(16, 64) - 1
    v = 1e6 + torch.arange(16 * 64, dtype=torch.float32).reshape(16, 64)
    qkv = M.fuse_qkv(q, k, v, dims)
    assert qkv.shape == (dims.qkv_rows, 64) == (96, 64)
    rows = (hpg + 2) * hd  # 48 rows per group: 4 q heads, 1 k head, 1 v head
    for g in range(2):
        block = qkv[g * rows : (g + 1) * rows]
        assert torch.equal(block[: hpg * hd], q[g * hpg * hd : (g + 1) * hpg * hd])
        assert torch.equal(block[hpg * hd : hpg * hd + hd], k[g * hd : (g + 1) * hd])
        assert torch.equal(block[hpg * hd + hd :], v[g * hd : (g + 1) * hd])
    for got, want in zip(M.split_qkv(qkv, dims), (q, k, v)):
        assert torch.equal(got, want)
    # TP=2: rank r holds exactly query group r.
    assert torch.equal(
        M.tp_shard("decoder.layers.0.self_attention.linear_qkv.weight", qkv, 2, 1, dims), qkv[rows:]
    )


def test_fc1_is_gate_then_up_and_each_tp_rank_holds_its_gate_then_its_up():
    dims = _dims()
    gate, up = torch.randn(176, 64), torch.randn(176, 64)
    fc1 = M.fuse_gate_up(gate, up)
    assert torch.equal(fc1[:176], gate) and torch.equal(fc1[176:], up)
    shard = M.tp_shard("decoder.layers.2.mlp.linear_fc1.weight", fc1, 2, 1, dims)
    assert torch.equal(shard, torch.cat([gate[88:], up[88:]]))
    assert all(torch.equal(a, b) for a, b in zip(M.split_gate_up(fc1), (gate, up)))


def test_vocab_padding_repeats_last_row_and_export_trims():
    dims = _dims()
    emb = torch.randn(VOCAB, 64)
    mapping = M.param_mappings(dims)[0]
    padded = mapping.to_megatron([emb])
    assert padded.shape == (PADDED, 64)
    assert torch.equal(padded[:VOCAB], emb) and torch.equal(padded[VOCAB:], emb[-1:].expand(6, -1))
    assert torch.equal(mapping.to_hf(padded)[0], emb)


def test_te_names_and_checkpoint_keys():
    name = "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight"
    assert M.canonical_megatron_name(name) == "decoder.layers.3.input_layernorm.weight"
    assert M.checkpoint_key("decoder.layers.3.pre_mlp_layernorm.weight") == (
        "decoder.layers.mlp.linear_fc1.layer_norm_weight",
        3,
    )
    assert M.checkpoint_key("decoder.layers.1.router.bias") == (
        "decoder.layers.1.router.bias",
        None,
    )
    assert M.checkpoint_key("output_layer.weight") == ("output_layer.weight", None)


def test_mapping_covers_every_megatron_parameter(mcore):
    from megatron_mod.models import build_gpt_model, llama_config

    model = build_gpt_model(llama_config("tiny"), MoDConfig(), vocab_size=PADDED, max_seq_len=32)
    dims = _dims()
    mappings = {m.megatron_name: m for m in M.param_mappings(dims, [1, 3])}
    params = dict(model.named_parameters())
    assert set(params) == set(mappings)
    for name, param in params.items():
        assert tuple(param.shape) == mappings[name].megatron_shape, name


# ------------------------------------------------------------------------------ checkpoint format


def test_metadata_for_preset_and_custom_shapes(mcore):
    from megatron_mod.hf.config import hf_config_to_metadata

    base = dict(architectures=["LlamaForCausalLM"], num_hidden_layers=32, hidden_size=4096)
    base.update(num_attention_heads=32, intermediate_size=11008, vocab_size=32000)
    md = hf_config_to_metadata(dict(base, rms_norm_eps=1e-5), 8, 4, MoDConfig(), torch.bfloat16)
    assert md.preset == "llama2-7b" and md.padded_vocab_size == 32768
    custom = dict(base, hidden_size=512, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6)
    md = hf_config_to_metadata(custom, 1, 1, None, torch.float32)
    config = md.transformer_config()
    assert md.preset == config.preset == "custom"
    assert (config.hidden_size, config.num_query_groups, config.kv_channels) == (512, 8, 128)
    assert md.dims().head_dim == 128 and md.dims().qkv_rows == (32 + 16) * 128


# config.json fields of the real targets (published configs; no weights needed).
_REAL_CONFIGS = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5,
                      vocab_size=32000),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40, rms_norm_eps=1e-5,
                       vocab_size=32000),
    "llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, rms_norm_eps=1e-5,
                       vocab_size=32000),
    "minima-2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=24,
                        num_attention_heads=24, num_key_value_heads=24, rms_norm_eps=1e-6,
                        vocab_size=49216),
}  # fmt: skip


@pytest.mark.parametrize(
    "preset, tp, pp, padded",
    [
        ("llama2-7b", 8, 4, 32768),
        ("llama2-13b", 4, 2, 32256),
        ("llama2-70b", 8, 8, 32768),
        ("minima-2-3b", 2, 2, 49408),
    ],
)
def test_real_model_configs_detect_preset_and_match_the_model(mcore, preset, tp, pp, padded):
    """Each target's config.json maps to its preset, and the mapping matches the built model."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from megatron_mod.checkpointing import build_model_from_metadata, model_sharded_state_dict
    from megatron_mod.hf.config import hf_config_to_metadata

    config = dict(
        _REAL_CONFIGS[preset],
        architectures=["LlamaForCausalLM"],
        max_position_embeddings=4096,
        rope_theta=10000.0,
        torch_dtype="float16",
    )
    md = hf_config_to_metadata(config, tp, pp, MoDConfig(), torch.bfloat16)
    assert md.preset == preset and md.padded_vocab_size == padded
    assert (md.tensor_model_parallel_size, md.pipeline_model_parallel_size) == (tp, pp)
    dims = md.dims()
    assert dims.num_query_groups % tp == 0 and dims.num_layers % pp == 0
    # A meta-device TP=1 model (no memory): its checkpoint entries are exactly the mapping's.
    model = build_model_from_metadata(
        md, meta_device=True, tensor_model_parallel_size=1, pipeline_model_parallel_size=1
    )
    routed = md.routed_layers()
    assert routed == list(range(1, dims.num_layers, 2))  # every_other by default
    mappings = {m.megatron_name: m for m in M.param_mappings(dims, routed)}
    entries = {
        n: v for n, v in model_sharded_state_dict(model).items() if not isinstance(v, ShardedObject)
    }
    assert set(entries) == set(mappings)
    for name, item in entries.items():
        assert tuple(item.data.shape) == mappings[name].megatron_shape, name


@pytest.mark.parametrize(
    "preset, tp, pp, match",
    [
        ("llama2-70b", 16, 1, r"--tp 16 does not divide num_key_value_heads=8"),
        ("llama2-13b", 3, 1, r"--tp 3 does not divide num_attention_heads=40"),
        ("minima-2-3b", 1, 5, r"--pp 5 does not divide num_hidden_layers=24"),
    ],
)
def test_real_model_configs_refuse_bad_layouts(preset, tp, pp, match):
    from megatron_mod.hf.config import hf_config_to_metadata
    from megatron_mod.hf.io import ConversionError

    config = dict(_REAL_CONFIGS[preset], architectures=["LlamaForCausalLM"])
    with pytest.raises(ConversionError, match=match):
        hf_config_to_metadata(config, tp, pp, MoDConfig(), torch.bfloat16)


def test_pytorch_bin_checkpoint_imports_with_weights_only_load(work, tmp_path, monkeypatch):
    """Sharded pytorch_model*.bin sources load through torch.load(weights_only=True) only."""
    from megatron_mod.hf.convert import convert_hf_to_megatron

    src = tmp_path / "hf_bin"
    work["hf"].config.save_pretrained(src)
    save_bin_shards(work["hf"].state_dict(), src, 5)
    assert (src / "pytorch_model.bin.index.json").is_file()
    assert not list(src.glob("*.safetensors"))
    calls = []
    original = torch.load

    def checked_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", checked_load)
    convert_hf_to_megatron(src, tmp_path / "ck", mod_config=P0, progress=False)
    monkeypatch.undo()
    assert calls and all(w is True for w in calls)
    logits, _, _ = _megatron_logits(tmp_path / "ck", work["tokens"])
    assert (logits[..., :VOCAB] - work["ref"]).abs().max() <= 1e-4


def test_checkpoint_layout_and_stored_keys(work):
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_mod.checkpointing import read_checkpoint_metadata

    ck = work["root"] / "ck_p0"
    assert (ck / "latest").read_text().strip() == "iter_0000000"
    assert sorted(os.listdir(ck / "tokenizer")) == sorted(
        f for f in os.listdir(work["root"] / "hf") if f.startswith(("tokenizer", "special"))
    )
    md = read_checkpoint_metadata(ck)
    assert (md.vocab_size, md.padded_vocab_size) == (VOCAB, PADDED)
    assert (md.tensor_model_parallel_size, md.pipeline_model_parallel_size) == (2, 2)
    assert md.mod_config == P0 and md.tokenizer_dir == "tokenizer"
    stored = FileSystemReader(str(ck / "iter_0000000")).read_metadata().state_dict_metadata
    tensors = {k: v.size for k, v in stored.items() if hasattr(v, "chunks")}
    expected = {}
    for mapping in M.param_mappings(_dims(), list(range(4))):
        key, layer = M.checkpoint_key(mapping.megatron_name)
        expected[key] = ((4,) if layer is not None else ()) + mapping.megatron_shape
    assert {k: tuple(v) for k, v in tensors.items()} == expected
    assert expected["decoder.layers.self_attention.linear_qkv.layer_norm_weight"] == (4, 64)
    assert expected["decoder.layers.mlp.linear_fc1.weight"] == (4, 352, 64)


def test_import_logits_match_hf_single_process(work):
    logits, kept, _ = _megatron_logits(work["root"] / "ck_p0", work["tokens"])
    assert logits.shape[-1] == PADDED
    assert (logits[..., :VOCAB] - work["ref"]).abs().max() <= 1e-4
    assert kept == {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}


def test_dense_export_reloads_as_stock_llama(work):
    from transformers import LlamaForCausalLM

    from megatron_mod.hf.convert import convert_megatron_to_hf

    out = work["root"] / "hf_dense"
    convert_megatron_to_hf(
        work["root"] / "ck_p0", out, dense=True, max_shard_size="40KB", progress=False
    )
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert "auto_map" not in config and not any(k.startswith("mod_") for k in config)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not any("router" in k for k in index["weight_map"])
    assert (out / "tokenizer.json").is_file() and not (out / "modeling_llama_mod.py").exists()
    model = LlamaForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(work["tokens"]).logits
    assert (logits - work["ref"]).abs().max() == 0  # fp32 all the way: bitwise round trip
    original = work["hf"].state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, original[name]), name


def test_mod_export_layout(work):
    from safetensors import safe_open

    from megatron_mod.hf.config import MOD_AUTO_MAP
    from megatron_mod.hf.convert import convert_megatron_to_hf

    out = work["root"] / "hf_mod_bf16"
    convert_megatron_to_hf(work["root"] / "ck_routed", out, dtype="bf16", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama_mod" and config["auto_map"] == MOD_AUTO_MAP
    assert config["mod_routed_layers"] == [0, 1, 2, 3] and config["mod_threshold"] == 0.5
    assert config["vocab_size"] == VOCAB
    for name in ("configuration_llama_mod.py", "modeling_llama_mod.py", "tokenizer.json"):
        assert (out / name).is_file()
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert f.get_tensor("model.layers.0.router.weight").dtype == torch.float32
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == torch.bfloat16
        assert f.get_tensor("lm_head.weight").shape == (VOCAB, 64)


def test_topk_export_carries_the_decode_threshold_and_decodes_with_cache(work, tmp_path):
    from transformers import AutoModelForCausalLM

    from megatron_mod.hf.convert import convert_hf_to_megatron, convert_megatron_to_hf

    topk = MoDConfig(routing="topk", capacity=0.5, routed_layers="1,3", topk_decode_threshold=0.6)
    convert_hf_to_megatron(work["root"] / "hf", tmp_path / "ck", mod_config=topk, progress=False)
    convert_megatron_to_hf(tmp_path / "ck", tmp_path / "hf", progress=False)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["mod_routing"] == "topk" and config["mod_topk_decode_threshold"] == 0.6
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    assert model.config.mod_topk_decode_threshold == 0.6
    prompt = work["tokens"][:1, :8]
    out = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=True)
    assert out.shape == (1, 12)


def test_mod_export_p0_matches_hf_base(work):
    from transformers import AutoModelForCausalLM

    from megatron_mod.hf.convert import convert_megatron_to_hf

    out = work["root"] / "hf_mod_p0"
    convert_megatron_to_hf(work["root"] / "ck_p0", out, progress=False)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(model).__name__ == "LlamaModForCausalLM"
    with torch.no_grad():
        logits = model(work["tokens"]).logits
    assert (logits - work["ref"]).abs().max() <= 1e-4


def test_routed_megatron_matches_exported_hf_mod_model(work):
    from transformers import AutoModelForCausalLM

    from megatron_mod.hf.convert import convert_megatron_to_hf

    logits, kept, _ = _megatron_logits(work["root"] / "ck_routed", work["tokens"])
    assert all(0.1 < f < 0.9 for f in kept.values()), kept  # routing really skips tokens
    out = work["root"] / "hf_mod_routed"
    convert_megatron_to_hf(work["root"] / "ck_routed", out, progress=False)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        hf_logits = model(work["tokens"]).logits
    assert (hf_logits - logits[..., :VOCAB]).abs().max() <= 1e-4
    assert (logits[..., :VOCAB] - work["ref"]).abs().max() > 1e-2  # routing changed the output
    hf_kept = _hf_kept_fractions(model, work["tokens"])
    assert hf_kept == pytest.approx(kept, abs=1e-6)


def test_skipped_kv_megatron_matches_exported_hf_mod_model(work, tmp_path):
    """--mod-skipped-kv is a routing setting: it travels in the checkpoint and the export, and
    both sides compute the same logits with it."""
    import dataclasses

    from transformers import AutoModelForCausalLM

    from megatron_mod.hf.convert import convert_hf_to_megatron, convert_megatron_to_hf

    ckpt = tmp_path / "ck_skipped_kv"
    mod = dataclasses.replace(ROUTED, skipped_kv=True)
    convert_hf_to_megatron(work["root"] / "hf", ckpt, tp=2, pp=1, mod_config=mod, progress=False)
    logits, kept, _ = _megatron_logits(ckpt, work["tokens"])
    kept_only, kept_only_fractions, _ = _megatron_logits(work["root"] / "ck_routed", work["tokens"])
    assert kept[0] == kept_only_fractions[0]  # same routers: layer 0 routes the same embeddings
    assert all(0.1 < f < 0.9 for f in kept.values()), kept
    assert (logits - kept_only).abs().max() > 1e-2  # skipped tokens' K/V are seen
    out = tmp_path / "hf"
    convert_megatron_to_hf(ckpt, out, progress=False)
    assert json.loads((out / "config.json").read_text())["mod_skipped_kv"] is True
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        hf_logits = model(work["tokens"]).logits
    assert (hf_logits - logits[..., :VOCAB]).abs().max() <= 1e-4


def _hf_kept_fractions(model, tokens) -> dict[int, float]:
    """Per-layer kept fraction of the HF MoD model, from its routers (g >= p on layer inputs,
    the first token always kept when the config says so)."""
    fractions = {}
    hooks = []
    threshold = model.config.mod_threshold
    for i, layer in enumerate(model.model.layers):
        router = getattr(layer, "router", None)
        if router is None:
            continue

        def hook(module, args, output, i=i):
            keep = torch.sigmoid(output.float()) >= threshold  # [b, s]
            if model.config.mod_keep_first_token:
                keep[:, 0] = True
            fractions[i] = float(keep.float().mean())

        hooks.append(router.register_forward_hook(hook))
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    return fractions


def test_roundtrip_from_exported_mod_checkpoint_keeps_routers(work, tmp_path):
    """A llama_mod export imports back with its router weights (source routers are used)."""
    from megatron_mod.hf.convert import convert_hf_to_megatron, convert_megatron_to_hf

    exported = tmp_path / "hf_mod"
    convert_megatron_to_hf(work["root"] / "ck_routed", exported, progress=False)
    config = json.loads((exported / "config.json").read_text())
    config["architectures"] = ["LlamaModForCausalLM"]
    (exported / "config.json").write_text(json.dumps(config))
    summary = convert_hf_to_megatron(
        exported, tmp_path / "ck2", mod_config=ROUTED, seed=999, progress=False
    )
    assert any("taken from the source" in n for n in summary.notes)
    a, _, _ = _megatron_logits(work["root"] / "ck_routed", work["tokens"])
    b, _, _ = _megatron_logits(tmp_path / "ck2", work["tokens"])
    assert torch.equal(a, b)


def test_converters_ask_for_no_gpu_on_a_gpu_host(work, tmp_path, monkeypatch):
    """On a CUDA host megatron-core allocates on torch.cuda.current_device() unless the config
    says use_cpu_initialization: a conversion must never get there (a 70B planning model would
    be materialised on GPU 0). Here the host claims CUDA and any request for a device fails."""
    from megatron_mod.checkpointing import build_model_from_metadata, read_checkpoint_metadata
    from megatron_mod.hf.convert import convert_hf_to_megatron, convert_megatron_to_hf

    def no_gpu(*args, **kwargs):
        raise AssertionError("the converter asked for a CUDA device")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("current_device", "set_device", "synchronize", "mem_get_info"):
        monkeypatch.setattr(torch.cuda, name, no_gpu)
    metadata = read_checkpoint_metadata(work["root"] / "ck_routed")
    model = build_model_from_metadata(
        metadata, meta_device=True, tensor_model_parallel_size=1, pipeline_model_parallel_size=1
    )
    assert model.config.use_cpu_initialization
    for name, param in model.named_parameters():
        assert param.device.type == ("cpu" if ".router." in name else "meta"), name
    convert_hf_to_megatron(
        work["root"] / "hf", tmp_path / "ck", tp=2, pp=2, mod_config=ROUTED, progress=False
    )
    convert_megatron_to_hf(tmp_path / "ck", tmp_path / "hf", progress=False)
    assert (tmp_path / "hf" / "model.safetensors").is_file()


_FAKE_CUDA_HOST = """
import runpy, sys, torch

def no_gpu(name):
    def refuse(*args, **kwargs):  # one function per name: torch._dynamo indexes them
        raise AssertionError(f"the converter called torch.cuda.{name}")
    return refuse

torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 8
# (torch.manual_seed's torch.cuda.manual_seed_all only queues the seed until CUDA starts.)
for name in ("current_device", "set_device", "synchronize", "init", "_lazy_init",
             "get_rng_state", "set_rng_state", "mem_get_info", "current_stream", "Stream",
             "stream", "empty_cache"):
    setattr(torch.cuda, name, no_gpu(name))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_converter_clis_leave_every_gpu_alone_on_a_cuda_host(work, tmp_path):
    """Both CLIs as on a GPU host (torch reports CUDA, any CUDA entry point fails), in fresh
    processes that never apply megatron_mod's CPU patches: conversion selects no GPU, creates no
    CUDA context and allocates nothing there."""
    env = subprocess_env()
    ck, hf = tmp_path / "ck", tmp_path / "hf"
    for tool, args in (
        ("convert_hf_to_megatron.py", ["--hf-dir", work["root"] / "hf", "--out-dir", ck,
                                        "--tp", "2", "--pp", "2"]),
        ("convert_megatron_to_hf.py", ["--load", ck, "--out-dir", hf]),  # Megatron-LM's name
    ):  # fmt: skip
        cmd = [sys.executable, "-c", _FAKE_CUDA_HOST, str(REPO / "tools" / tool)]
        cmd += [str(a) for a in args] + ["--no-progress"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(work["tokens"]).logits
    assert torch.isfinite(logits).all()


def test_tied_embeddings_stay_tied(tmp_path, mcore):
    """A tied source (SmolLM2, LLaMA-3.2 1B/3B) becomes a megatron model with one shared matrix
    and exports with tie_word_embeddings and no lm_head tensor."""
    from safetensors import safe_open

    from megatron_mod.checkpointing import load_model_checkpoint
    from megatron_mod.checkpointing.streaming import checkpoint_tensor_shapes
    from megatron_mod.hf.convert import convert_hf_to_megatron, convert_megatron_to_hf

    hf = _make_hf(tmp_path / "hf", seed=3, tie_word_embeddings=True)
    tokens = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    summary = convert_hf_to_megatron(
        tmp_path / "hf", tmp_path / "ck", mod_config=P0, progress=False
    )
    assert any("kept tied" in n for n in summary.notes)
    assert "output_layer.weight" not in checkpoint_tensor_shapes(tmp_path / "ck" / "iter_0000000")
    model, _ = load_model_checkpoint(tmp_path / "ck")
    assert model.share_embeddings_and_output_weights and model.output_layer.weight is None
    logits, _, _ = _megatron_logits(tmp_path / "ck", tokens)
    with torch.no_grad():
        assert (logits[..., :VOCAB] - hf(tokens).logits).abs().max() <= 1e-4
    convert_megatron_to_hf(tmp_path / "ck", tmp_path / "out", progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" not in f.keys()


def test_reimport_of_a_mod_export_keeps_its_mod_settings(work, tmp_path):
    """A llama_mod export carries its routing settings; importing it again keeps them, and only
    a --mod-* flag given on the command line replaces one."""
    from megatron_mod.checkpointing import read_checkpoint_metadata
    from megatron_mod.hf.convert import convert_megatron_to_hf
    from tools.convert_hf_to_megatron import main

    exported = tmp_path / "hf_mod"
    convert_megatron_to_hf(work["root"] / "ck_routed", exported, progress=False)
    config = json.loads((exported / "config.json").read_text())
    config["mod_gate"] = "straight_through"  # as if trained with that gate
    (exported / "config.json").write_text(json.dumps(config))
    args = ["--hf-dir", str(exported), "--no-progress"]
    assert main(args + ["--out-dir", str(tmp_path / "a")]) == 0
    mod = read_checkpoint_metadata(tmp_path / "a").mod_config
    assert (mod.routed_layers, mod.gate, mod.threshold) == ([0, 1, 2, 3], "straight_through", 0.5)
    assert main(args + ["--out-dir", str(tmp_path / "b"), "--mod-threshold", "0.25"]) == 0
    mod = read_checkpoint_metadata(tmp_path / "b").mod_config
    assert (mod.routed_layers, mod.gate, mod.threshold) == ([0, 1, 2, 3], "straight_through", 0.25)


def test_bf16_import_stores_bf16_and_keeps_routers_fp32(work, tmp_path):
    from megatron_mod.checkpointing.streaming import checkpoint_tensor_dtypes
    from megatron_mod.hf.convert import convert_hf_to_megatron

    convert_hf_to_megatron(
        work["root"] / "hf", tmp_path / "ck", mod_config=MoDConfig(), dtype="bf16", progress=False
    )
    dtypes = checkpoint_tensor_dtypes(tmp_path / "ck" / "iter_0000000")
    assert dtypes["decoder.layers.1.router.weight"] == torch.float32
    assert dtypes["decoder.layers.self_attention.linear_qkv.weight"] == torch.bfloat16
    # An fp32 model loads the bf16 checkpoint (dist_checkpointing casts on load).
    logits, _, metadata = _megatron_logits(tmp_path / "ck", work["tokens"])
    assert metadata.params_dtype == "bfloat16" and torch.isfinite(logits).all()


# ------------------------------------------------------------------------------ CLI and bad input


def _cli(tool: str, *args: str) -> subprocess.CompletedProcess:
    env = subprocess_env()
    cmd = [sys.executable, str(REPO / "tools" / tool), "--no-progress", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_cli_import_and_nonempty_out_dir_refused(work, tmp_path):
    out = tmp_path / "ck"
    hf = str(work["root"] / "hf")
    flags = ["--tp", "2", "--mod-threshold", "0.25", "--mod-routed-layers", "1,3"]
    proc = _cli("convert_hf_to_megatron.py", "--hf-dir", hf, "--out-dir", str(out), *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "HF -> Megatron" in proc.stdout and "peak RSS" in proc.stdout
    md = json.loads((out / "megatron_mod_config.json").read_text())
    assert md["mod"]["threshold"] == 0.25 and md["mod"]["routed_layers"] == [1, 3]
    before = sorted(p.name for p in out.rglob("*"))
    proc = _cli("convert_hf_to_megatron.py", "--hf-dir", hf, "--out-dir", str(out))
    assert proc.returncode == 2 and "--out-dir" in proc.stderr and "--overwrite" in proc.stderr
    assert sorted(p.name for p in out.rglob("*")) == before
    hf_out = tmp_path / "hf_out"
    hf_out.mkdir()
    (hf_out / "keep.txt").write_text("x")
    proc = _cli("convert_megatron_to_hf.py", "--ckpt-dir", str(out), "--out-dir", str(hf_out))
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert os.listdir(hf_out) == ["keep.txt"]


def _variant(work, tmp_path, edit_config=None, edit_tensors=None) -> Path:
    """A single-file copy of the HF source with an edited config and/or tensors."""
    from safetensors.torch import save_file

    src, dst = work["root"] / "hf", tmp_path / "hf_bad"
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    if edit_config:
        edit_config(config)
    (dst / "config.json").write_text(json.dumps(config))
    tensors = {k: v.contiguous() for k, v in work["hf"].state_dict().items()}
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _assert_nothing_written(out: Path):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize(
    "case, kwargs, match",
    [
        ("missing", {}, r"model\.layers\.2\.mlp\.up_proj\.weight is missing"),
        ("shape", {}, r"self_attn\.k_proj\.weight has shape \[8, 64\], expected \[16, 64\]"),
        ("tp", {"tp": 4}, r"--tp 4 does not divide num_key_value_heads=2.*use one of \[1, 2\]"),
        ("pp", {"pp": 3}, r"--pp 3 does not divide num_hidden_layers=4"),
        ("arch", {}, r"architectures=\['GemmaForCausalLM'\] is not supported"),
        ("rope", {}, r"RoPE scaling of type 'linear' is not supported"),
        ("rope3", {}, r"llama3 RoPE scaling .* high_freq_factor=4.*'high_freq_factor': 2"),
        ("key", {}, r"unknown config keys \['attn_logit_softcapping'\]"),
        ("window", {}, r"sliding-window attention \(sliding_window=4096\) is not supported"),
        ("f64", {}, r"model\.norm\.weight is stored as F64"),
        ("layers", {"mod_config": MoDConfig(routed_layers=[1, 7])}, r"--mod-routed-layers.*\[7\]"),
    ],
)
def test_bad_input_is_refused_before_writing(work, tmp_path, case, kwargs, match):
    from megatron_mod.hf.convert import convert_hf_to_megatron
    from megatron_mod.hf.io import ConversionError

    edits = {
        "missing": dict(edit_tensors=lambda t: t.pop("model.layers.2.mlp.up_proj.weight")),
        "shape": dict(
            edit_tensors=lambda t: t.update(
                {"model.layers.1.self_attn.k_proj.weight": torch.zeros(8, 64)}
            )
        ),
        "arch": dict(edit_config=lambda c: c.update(architectures=["GemmaForCausalLM"])),
        "rope": dict(edit_config=lambda c: c.update(rope_scaling={"type": "linear", "factor": 2})),
        "rope3": dict(
            edit_config=lambda c: c.update(
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 2.0,
                    "original_max_position_embeddings": 8192,
                }
            )
        ),
        "key": dict(edit_config=lambda c: c.update(attn_logit_softcapping=50.0)),
        "window": dict(
            edit_config=lambda c: c.update(
                architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=4096
            )
        ),
        "f64": dict(
            edit_tensors=lambda t: t.update({"model.norm.weight": torch.ones(64).double()})
        ),
    }
    hf_dir = _variant(work, tmp_path, **edits.get(case, {}))
    out = tmp_path / "out"
    kwargs = {"mod_config": MoDConfig(), **kwargs}
    with pytest.raises(ConversionError, match=match) as err:
        convert_hf_to_megatron(hf_dir, out, progress=False, **kwargs)
    if case in ("missing", "shape"):
        assert str(hf_dir) in str(err.value)  # names the file
    _assert_nothing_written(out)


def test_mixed_dtype_source_is_stored_as_fp32_with_a_note(work, tmp_path):
    """bf16 weights with fp32 norms (as some checkpoints ship): stored fp32, which holds both
    exactly, and the summary says so."""
    from megatron_mod.checkpointing import read_checkpoint_metadata
    from megatron_mod.hf.convert import convert_hf_to_megatron

    def mix(tensors):
        for name in tensors:
            if "norm" not in name:
                tensors[name] = tensors[name].to(torch.bfloat16)

    hf_dir = _variant(work, tmp_path, edit_tensors=mix)
    summary = convert_hf_to_megatron(hf_dir, tmp_path / "ck", mod_config=P0, progress=False)
    assert any("mixes dtypes" in n and "bfloat16" in n for n in summary.notes), summary.notes
    assert read_checkpoint_metadata(tmp_path / "ck").params_dtype == "float32"


def test_failure_midway_leaves_no_output(work, tmp_path, monkeypatch):
    from megatron_mod.checkpointing.streaming import StreamingCheckpointWriter
    from megatron_mod.hf.convert import convert_hf_to_megatron

    calls = []
    original = StreamingCheckpointWriter.write_part

    def failing(self, part):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return original(self, part)

    monkeypatch.setattr(StreamingCheckpointWriter, "write_part", failing)
    out = tmp_path / "ck"
    with pytest.raises(OSError, match="simulated"):
        convert_hf_to_megatron(work["root"] / "hf", out, mod_config=P0, progress=False)
    _assert_nothing_written(out)


def test_overwrite_replaces_output(work, tmp_path):
    from megatron_mod.hf.convert import convert_megatron_to_hf

    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.bin").write_text("old")
    convert_megatron_to_hf(work["root"] / "ck_p0", out, dense=True, overwrite=True, progress=False)
    assert not (out / "stale.bin").exists() and (out / "model.safetensors").is_file()
    _assert_nothing_written(tmp_path / "nothing")  # no stray temp dirs next to the output


@pytest.mark.parametrize(
    "routed, edit, match",
    [
        (
            [1, 3],  # routers stored for layers 1 and 3; the config claims all four
            lambda md: md["mod"].update(routed_layers=[0, 1, 2, 3]),
            r"lacks keys \['decoder\.layers\.0\.router\.bias'.*--dense",
        ),
        (
            "all",
            lambda md: md["model_overrides"].update(ffn_hidden_size=192),
            r"linear_fc1\.weight is stored with shape \[4, 352, 64\].*\[4, 384, 64\]",
        ),
    ],
)
def test_export_bad_checkpoint_is_refused_before_writing(work, tmp_path, routed, edit, match):
    """A config that does not describe the stored tensors fails before the export writes."""
    from megatron_mod.hf.convert import convert_hf_to_megatron, convert_megatron_to_hf
    from megatron_mod.hf.io import ConversionError

    ck = tmp_path / "ck"
    mod = MoDConfig(routed_layers=routed)
    convert_hf_to_megatron(work["root"] / "hf", ck, mod_config=mod, progress=False)
    md = json.loads((ck / "megatron_mod_config.json").read_text())
    edit(md)
    (ck / "megatron_mod_config.json").write_text(json.dumps(md))
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=match):
        convert_megatron_to_hf(ck, out, progress=False)
    _assert_nothing_written(out)


def test_export_of_unconverted_dir_names_the_missing_config(tmp_path):
    from megatron_mod.hf.convert import convert_megatron_to_hf

    with pytest.raises(FileNotFoundError, match="megatron_mod_config.json"):
        convert_megatron_to_hf(tmp_path, tmp_path / "out", progress=False)


# ------------------------------------------------------------------------------ multi-rank loads


def _torchrun(work, tp: int, pp: int, out: Path, resave: Path) -> dict[str, dict]:
    out.mkdir()
    root = work["root"]
    args = [
        "--tp", str(tp), "--pp", str(pp),
        "--hf-dir", str(root / "hf"), "--tokens", str(root / "tokens.pt"), "--out", str(out),
        "--ckpt", f"p0={root / 'ck_p0'}", "--ckpt", f"routed={root / 'ck_routed'}",
        "--save", f"routed={resave}",
    ]  # fmt: skip
    run_script(DIST_SCRIPT, args, nproc=tp * pp)
    return {n: torch.load(out / f"{n}.pt", weights_only=True) for n in ("p0", "routed")}


@pytest.mark.slow
@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2), (2, 2)])
def test_multi_rank_load_matches_hf_and_single_process(work, tmp_path, tp, pp):
    """Load under TP/PP, and export a checkpoint that a TP/PP run saved (per-rank chunks)."""
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_mod.checkpointing import read_checkpoint_metadata
    from megatron_mod.hf.convert import convert_megatron_to_hf

    resaved = tmp_path / "resaved"
    results = _torchrun(work, tp, pp, tmp_path / "out", resaved)
    p0, routed = results["p0"], results["routed"]
    assert p0["params_checked"] > 0  # every local tensor equals mapping.tp_shard(HF tensor)
    assert (p0["logits"][..., :VOCAB] - work["ref"]).abs().max() <= 1e-4
    single, kept, _ = _megatron_logits(work["root"] / "ck_routed", work["tokens"])
    assert (routed["logits"] - single).abs().max() <= 1e-4
    assert routed["kept"] == pytest.approx(kept, abs=1e-6)
    assert all(0.1 < f < 0.9 for f in kept.values())

    md = read_checkpoint_metadata(resaved)
    assert (md.tensor_model_parallel_size, md.pipeline_model_parallel_size) == (tp, pp)
    stored = FileSystemReader(str(resaved / "iter_0000000")).read_metadata().state_dict_metadata
    # fc1 is stored as 2 * tp chunks per layer (each rank's gate and up halves).
    assert len(stored["decoder.layers.mlp.linear_fc1.weight"].chunks) == 4 * 2 * tp
    exported = tmp_path / "hf_dense"
    convert_megatron_to_hf(resaved, exported, dense=True, progress=False)
    from safetensors.torch import load_file

    tensors = load_file(exported / "model.safetensors")
    original = work["hf"].state_dict()
    assert set(tensors) == set(original)
    for name, tensor in tensors.items():
        assert torch.equal(tensor, original[name]), name
    resaved_logits, resaved_kept, _ = _megatron_logits(resaved, work["tokens"])
    assert torch.equal(resaved_logits, single) and resaved_kept == kept
    # The MoD export of the TP/PP-saved checkpoint reproduces the Megatron model.
    from transformers import AutoModelForCausalLM

    convert_megatron_to_hf(resaved, tmp_path / "hf_mod", progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_mod", trust_remote_code=True)
    with torch.no_grad():
        hf_logits = model.eval()(work["tokens"]).logits
    assert (hf_logits - single[..., :VOCAB]).abs().max() <= 1e-4
