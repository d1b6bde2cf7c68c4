"""The tiny LLaMA shape the HF tests build with ``transformers`` (GQA: 8 heads, 2 KV groups)."""

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
    code_dir = Path(__file__).resolve().parents[1] / "megatron_mod" / "hf"
    for name in HF_MODELING_FILES:
        shutil.copy2(code_dir / name, out / name)
    config = json.loads((out / "config.json").read_text())
    config["auto_map"] = dict(MOD_AUTO_MAP)
    (out / "config.json").write_text(json.dumps(config))
