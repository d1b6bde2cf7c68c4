"""Tiny Hugging Face LLaMA models and directories for the tests.

``TINY_LLAMA`` is the shape the HF tests build with ``transformers`` (GQA: 8 heads, 2 KV groups);
the helpers write directories as the exporter (``llama_mod`` with its code) or transformers 4
(``.bin`` shards) lay them out.
"""

from pathlib import Path

TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
"""``LlamaConfig`` fields besides the vocabulary (head dim 8, SwiGLU width 176)."""

TINY_VOCAB = 250
"""Vocabulary of the random tiny models (padded to 256 by the converters)."""


def tiny_hf_config_kwargs(**overrides) -> dict:
    """``LlamaConfig`` / ``LlamaModConfig`` keyword arguments of the random tiny model: the tiny
    shape, vocabulary 250, pad id 0 and no BOS/EOS, with ``overrides`` applied."""
    base = dict(
        vocab_size=TINY_VOCAB, **TINY_LLAMA, pad_token_id=0, bos_token_id=None, eos_token_id=None
    )
    return {**base, **overrides}


def save_remote_code_dir(model, out) -> None:
    """Save an HF ``LlamaModForCausalLM`` as the exporter lays out a ``llama_mod`` directory:
    safetensors weights, ``config.json`` with ``auto_map``, and the modeling code beside them."""
    import json
    import shutil
    from pathlib import Path

    from megatron_mod.hf.config import MOD_AUTO_MAP
    from megatron_mod.hf.convert import HF_MODELING_FILES

    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    code_dir = Path(__file__).resolve().parents[2] / "megatron_mod" / "hf"
    for name in HF_MODELING_FILES:
        shutil.copy2(code_dir / name, out / name)
    config = json.loads((out / "config.json").read_text())
    config["auto_map"] = dict(MOD_AUTO_MAP)
    (out / "config.json").write_text(json.dumps(config))


def save_bin_shards(state: dict, out: Path, num_shards: int, key=None) -> list[str]:
    """Write ``pytorch_model-*.bin`` shards and their index, as transformers 4 did (5 saves
    safetensors only); tensor ``i`` (in ``key`` order) goes to shard ``i % num_shards``."""
    import json

    import torch

    out.mkdir(parents=True, exist_ok=True)
    names = sorted(state, key=key) if key else list(state)
    files, weight_map = [], {}
    for i in range(num_shards):
        file = f"pytorch_model-{i + 1:05d}-of-{num_shards:05d}.bin"
        shard = names[i::num_shards]
        torch.save({n: state[n].detach().clone() for n in shard}, out / file)
        weight_map.update({n: file for n in shard})
        files.append(file)
    index = {"metadata": {}, "weight_map": weight_map}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return files


def make_tiny_export(root: Path) -> tuple[Path, list[str]]:
    """A tiny llama_mod export as the exporter writes it (weights, config with auto_map, code,
    a byte-level BPE tokenizer trained here) in ``root/model``, and held-out documents."""
    import torch
    from transformers import AutoTokenizer

    from megatron_mod.data.local_text import stdlib_docstrings, train_hf_bpe
    from megatron_mod.hf.configuration_llama_mod import LlamaModConfig
    from megatron_mod.hf.modeling_llama_mod import LlamaModForCausalLM

    docs = stdlib_docstrings(limit=120)
    out = train_hf_bpe(docs[:80], root / "model", vocab_size=320)
    tok = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(0)
    config = LlamaModConfig(
        vocab_size=len(tok),
        **TINY_LLAMA,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        mod_routed_layers=[1, 3],
    )
    model = LlamaModForCausalLM(config).eval()
    with torch.no_grad():  # routers that keep about half of the tokens at p = 0.5
        for name, param in model.named_parameters():
            if "router.weight" in name:
                param.normal_(0.0, 0.3)
            elif "router.bias" in name:
                param.zero_()
            elif "embed" in name:
                param.normal_(0.0, 1.0)
    save_remote_code_dir(model, out)
    return out, docs[80:]


def make_tiny_hf_llama_with_text(root: Path, residual_scale, text_name: str):
    """A 6-layer tied LLaMA with a BPE tokenizer (trained on stdlib docstrings) and text.

    Args:
        root: directory to write ``base/`` and the text file into.
        residual_scale: ``layer_index -> factor`` for each layer's o_proj/down_proj weights
            (larger residual writes than the init's, so layers differ clearly).
        text_name: file name of the JSONL of docstrings the tokenizer did not see.

    Returns:
        ``(model_dir, text_path, tokenizer)``.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from megatron_mod.data.local_text import stdlib_docstrings, train_hf_bpe, write_jsonl

    texts = stdlib_docstrings(limit=400)
    model_dir = root / "base"
    train_hf_bpe(texts[:300], model_dir, vocab_size=400)
    tok = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    cfg = {**TINY_LLAMA, "num_hidden_layers": 6, "tie_word_embeddings": True}
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), **cfg))
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.mlp.down_proj.weight.mul_(residual_scale(i))
            layer.self_attn.o_proj.weight.mul_(residual_scale(i))
    model.save_pretrained(model_dir, safe_serialization=True)
    return model_dir, write_jsonl(texts[300:], root / text_name), tok
