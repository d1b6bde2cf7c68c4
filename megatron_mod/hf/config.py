"""Hugging Face ``config.json`` <-> megatron-mod checkpoint metadata, for the supported families.

Import reads a LLaMA-family config (LLaMA-2/3.x, Mistral without a sliding window, Qwen2/2.5,
megatron-mod's own ``llama_mod`` exports), refuses keys that would change the model's maths and
that the converter would not reproduce (an allow-list), and turns it into
:class:`~megatron_mod.checkpointing.CheckpointMetadata`. Export writes the config back
(:func:`hf_config_dict`): the source's ids and names, the checkpoint's model, and the MoD settings
of a ``llama_mod`` export.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_mod.checkpointing import CheckpointMetadata, dtype_name
from megatron_mod.config import MoDConfig
from megatron_mod.hf.io import ConversionError
from megatron_mod.hf.mapping import LlamaDims, padded_vocab_size

__all__ = [
    "FAMILIES",
    "MOD_AUTO_MAP",
    "SUPPORTED_ARCHITECTURES",
    "hf_config_dict",
    "hf_config_to_metadata",
    "source_mod_config",
]

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "LlamaModForCausalLM")
MOD_AUTO_MAP = {
    "AutoConfig": "configuration_llama_mod.LlamaModConfig",
    "AutoModelForCausalLM": "modeling_llama_mod.LlamaModForCausalLM",
}


def _detect_preset(shape: dict[str, Any]) -> str | None:
    from megatron_mod.models import PRESETS

    for name, preset in PRESETS.items():
        if all(shape.get(k) == v for k, v in preset.items()):
            return name
    return None


# Families and their HF classes: (architecture, model_type, q/k/v biases).
FAMILIES = {
    "LlamaForCausalLM": ("llama", False),
    "LlamaModForCausalLM": ("llama_mod", False),
    "MistralForCausalLM": ("mistral", False),
    "Qwen2ForCausalLM": ("qwen2", True),
}
# config.json keys read and checked below (shape, RoPE, biases, attention window, MoD).
_MODEL_KEYS = {
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "rms_norm_eps", "hidden_act", "rope_theta", "rope_scaling", "rope_parameters",
    "tie_word_embeddings", "attention_bias", "mlp_bias", "max_position_embeddings",
    "sliding_window", "use_sliding_window", "max_window_layers", "layer_types",
    "attention_qkv_bias",
    "mod_routing", "mod_threshold", "mod_capacity", "mod_gate", "mod_routed_layers",
    "mod_topk_decode_threshold", "mod_router_input", "mod_keep_first_token",
    "mod_layer_thresholds", "mod_skipped_kv",
}  # fmt: skip
# Keys that never change a causal LM's forward pass (ids, dtypes, bookkeeping, training-only
# dropout, HF's pretraining_tp which only splits the same matmuls).
_NEUTRAL_KEYS = {
    "_name_or_path", "_model_name_or_path", "_commit_hash", "auto_map", "transformers_version",
    "torch_dtype", "dtype", "unk_token_id",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "use_cache", "initializer_range", "attention_dropout", "pretraining_tp", "tokenizer_class",
    "output_attentions", "output_hidden_states", "return_dict", "torchscript", "id2label",
    "label2id", "problem_type", "finetuning_task", "task_specific_params", "prefix",
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "tie_encoder_decoder",
    "chunk_size_feed_forward", "pruned_heads", "cross_attention_hidden_size",
    "use_return_dict", "embd_pdrop", "resid_pdrop", "_attn_implementation_autoset",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "temperature",
    "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "num_beam_groups", "diversity_penalty",
    "tf_legacy_loss", "use_bfloat16", "architectures_version",
}  # fmt: skip
_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}  # fmt: skip


def _rope_settings(hf_config: dict[str, Any], config_path: str) -> tuple[float, float | None]:
    """(rope theta, LLaMA-3 scaling factor or None) from a transformers 4 or 5 config.

    transformers 4 writes ``rope_theta`` and ``rope_scaling``; transformers 5 writes
    ``rope_parameters`` (``rope_type``, ``rope_theta`` and the scaling fields in one dict).
    """
    params = hf_config.get("rope_parameters")
    scaling = hf_config.get("rope_scaling")
    theta = hf_config.get("rope_theta")
    if params is not None:
        if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
            raise ConversionError(
                f"{config_path}: rope_parameters={params} (per-layer RoPE) is not supported"
            )
        theta = params.get("rope_theta", theta)
        if params.get("rope_type", params.get("type", "default")) != "default":
            scaling = params
    if theta is None:
        theta = 10000.0
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise ConversionError(f"{config_path}: rope_theta={theta!r} must be a positive number")
    if not scaling:
        return float(theta), None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise ConversionError(
            f"{config_path}: RoPE scaling of type {kind!r} is not supported: megatron-core "
            "implements LLaMA-3 scaling (rope_type 'llama3') only, and converting without the "
            "scaling would change the model"
        )
    odd = {
        k: scaling.get(k)
        for k, v in _LLAMA3_ROPE.items()
        if scaling.get(k) is None or float(scaling[k]) != v
    }
    factor = scaling.get("factor")
    if odd or not isinstance(factor, (int, float)) or not factor >= 1:
        raise ConversionError(
            f"{config_path}: llama3 RoPE scaling {scaling} is not supported: megatron-core "
            f"fixes low_freq_factor=1, high_freq_factor=4, original_max_position_embeddings=8192 "
            f"and needs factor >= 1 (this config has factor={factor!r}"
            + (f", {odd}" if odd else "")
            + ")"
        )
    return float(theta), float(factor)


def _check_family(hf_config: dict[str, Any], config_path: str) -> tuple[str, bool]:
    """The model family (``FAMILIES``) and whether q/k/v carry biases; refuses what differs."""
    archs = hf_config.get("architectures") or []
    found = [a for a in archs if a in FAMILIES]
    if not found:
        raise ConversionError(
            f"{config_path}: architectures={archs} is not supported; this converter handles "
            f"{' / '.join(FAMILIES)} (LLaMA-2/3.x, Mistral, Qwen2/2.5 and megatron-mod exports)"
        )
    family, qkv_bias = FAMILIES[found[0]]
    generic = set()
    try:
        import transformers

        base = getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig
        generic = set(base().to_dict())
    except Exception:  # noqa: BLE001 - the fixed lists below still apply
        pass
    unknown = sorted(set(hf_config) - _MODEL_KEYS - _NEUTRAL_KEYS - generic)
    if unknown:
        raise ConversionError(
            f"{config_path}: unknown config keys {unknown}; they may change the model's "
            "computation, which this converter would not reproduce. Known model keys: "
            f"{sorted(k for k in _MODEL_KEYS if not k.startswith('mod_'))}. If a key does not "
            "affect the forward pass, remove it from config.json and convert again"
        )
    act = hf_config.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(
            f"{config_path}: hidden_act={act!r}; only 'silu' (SwiGLU) is supported"
        )
    if hf_config.get("mlp_bias"):
        raise ConversionError(f"{config_path}: mlp_bias=true is not supported")
    if hf_config.get("attention_bias"):
        raise ConversionError(
            f"{config_path}: attention_bias=true (biases on q/k/v and o_proj) is not supported; "
            "Qwen2-style q/k/v biases are (Qwen2ForCausalLM)"
        )
    if family == "llama_mod" and hf_config.get("attention_qkv_bias"):
        qkv_bias = True
    window = hf_config.get("sliding_window")
    if family == "qwen2":
        window = window if hf_config.get("use_sliding_window") else None
    if family in ("mistral", "qwen2") and window is not None:
        raise ConversionError(
            f"{config_path}: sliding-window attention (sliding_window={window}) is not "
            "supported: routed layers attend over the compacted kept tokens, where a window "
            "over original positions is not implemented. Mistral v0.2+ and Qwen2.5 "
            "checkpoints have no window (sliding_window null / use_sliding_window false)"
        )
    kinds = set(hf_config.get("layer_types") or ["full_attention"])
    if kinds != {"full_attention"}:
        raise ConversionError(
            f"{config_path}: layer_types {sorted(kinds)}: only full attention is supported"
        )
    return family, qkv_bias


def source_mod_config(hf_config: dict[str, Any]) -> dict[str, Any] | None:
    """The MoD settings a ``llama_mod`` export carries (``MoDConfig`` field -> value), or None."""
    if "LlamaModForCausalLM" not in (hf_config.get("architectures") or []):
        return None
    out = {}
    for field_name in ("routing", "threshold", "capacity", "gate", "routed_layers"):
        if hf_config.get(f"mod_{field_name}") is not None:
            out[field_name] = hf_config[f"mod_{field_name}"]
    if hf_config.get("mod_topk_decode_threshold") is not None:
        out["topk_decode_threshold"] = hf_config["mod_topk_decode_threshold"]
    # An export without these keys predates them: raw-h routers, first token routable.
    out["router_input"] = hf_config.get("mod_router_input", "hidden")
    out["keep_first_token"] = bool(hf_config.get("mod_keep_first_token", False))
    out["skipped_kv"] = bool(hf_config.get("mod_skipped_kv", False))
    thresholds = hf_config.get("mod_layer_thresholds") or {}
    if thresholds:
        out["layer_thresholds"] = {int(k): float(v) for k, v in thresholds.items()}
    return out


def hf_config_to_metadata(
    hf_config: dict[str, Any],
    tp: int,
    pp: int,
    mod_config: MoDConfig | None,
    params_dtype: torch.dtype,
    max_seq_len: int | None = None,
    config_path: str = "config.json",
) -> CheckpointMetadata:
    """Validate a HF ``config.json`` (LLaMA family) for a TP/PP layout and turn it into metadata.

    Raises:
        ConversionError: naming the config field or flag at fault and what to do.
    """

    def need(key: str):
        if key not in hf_config:
            raise ConversionError(f"{config_path}: missing required field {key!r}")
        return hf_config[key]

    _, qkv_bias = _check_family(hf_config, config_path)
    rope_theta, rope_factor = _rope_settings(hf_config, config_path)
    tied = bool(hf_config.get("tie_word_embeddings", False))

    layers, hidden = int(need("num_hidden_layers")), int(need("hidden_size"))
    heads = int(need("num_attention_heads"))
    groups = int(hf_config.get("num_key_value_heads") or heads)
    ffn, vocab = int(need("intermediate_size")), int(need("vocab_size"))
    head_dim = int(hf_config.get("head_dim") or hidden // heads)
    checks = [
        ("--tp", tp, "num_attention_heads", heads),
        ("--tp", tp, "num_key_value_heads", groups),
        ("--tp", tp, "intermediate_size", ffn),
        ("--pp", pp, "num_hidden_layers", layers),
    ]
    for flag, size, name, value in checks:
        if size < 1 or value % size:
            ok = [d for d in range(1, value + 1) if value % d == 0]
            raise ConversionError(
                f"{flag} {size} does not divide {name}={value} ({config_path}); use one of {ok}"
            )
    if heads % groups:
        raise ConversionError(
            f"{config_path}: num_key_value_heads={groups} must divide num_attention_heads={heads}"
        )
    if mod_config is not None:
        try:
            mod_config.routed_layer_indices(layers)
        except ValueError as err:
            raise ConversionError(f"--mod-routed-layers: {err}") from err

    shape = dict(
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=groups,
        ffn_hidden_size=ffn,
        layernorm_epsilon=float(hf_config.get("rms_norm_eps", 1e-6)),
    )
    preset = _detect_preset(shape)
    overrides: dict[str, Any] = dict(shape)
    overrides["rotary_base"] = rope_theta
    if rope_factor is not None:
        overrides.update(rope_scaling=True, rope_scaling_factor=rope_factor)
    if tied:
        overrides["share_embeddings_and_output_weights"] = True
    if qkv_bias:
        overrides["add_qkv_bias"] = True
    if head_dim * heads != hidden:
        overrides["kv_channels"] = head_dim
    if preset is None:
        preset = "custom"
    seq = int(max_seq_len or hf_config.get("max_position_embeddings") or 4096)
    return CheckpointMetadata(
        preset=preset,
        model_overrides=overrides,
        mod=mod_config.to_dict() if mod_config is not None else None,
        vocab_size=vocab,
        padded_vocab_size=padded_vocab_size(vocab, tp),
        max_seq_len=seq,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=dtype_name(params_dtype),
        hf_config=dict(hf_config),
    )


# Keys the export sets itself (or drops) rather than copying from the source config.
_EXPORT_DROPPED = {
    "_name_or_path", "transformers_version", "auto_map", "_commit_hash", "torch_dtype", "dtype",
    "rope_parameters", "rope_scaling", "rope_theta", "attention_qkv_bias",
}  # fmt: skip
_WINDOW_KEYS = ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types")


def hf_config_dict(
    metadata: CheckpointMetadata, dims: LlamaDims, dtype: torch.dtype, mod: MoDConfig | None
) -> dict[str, Any]:
    """config.json of the export: the source config's ids and names, the checkpoint's model.

    RoPE is written as ``rope_theta`` + ``rope_scaling``, which transformers 4 reads directly
    and transformers 5 converts to its ``rope_parameters``. A dense export keeps the source's
    architecture (LLaMA, Mistral, Qwen2); a MoD export is ``llama_mod``.
    """
    import transformers

    source = dict(metadata.hf_config or {})
    tc = metadata.transformer_config(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    cfg = {k: v for k, v in source.items() if k not in _EXPORT_DROPPED and not k.startswith("mod_")}
    rope_scaling = None
    if getattr(tc, "rope_scaling", False):
        rope_scaling = {
            "rope_type": "llama3",
            "factor": float(tc.rope_scaling_factor),
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    cfg.update(
        hidden_size=dims.hidden_size,
        intermediate_size=dims.ffn_hidden_size,
        num_hidden_layers=dims.num_layers,
        num_attention_heads=dims.num_attention_heads,
        num_key_value_heads=dims.num_query_groups,
        head_dim=dims.head_dim,
        vocab_size=dims.vocab_size,
        rms_norm_eps=tc.layernorm_epsilon,
        rope_theta=float(getattr(tc, "rotary_base", 10000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(source.get("max_position_embeddings", metadata.max_seq_len)),
        hidden_act="silu",
        tie_word_embeddings=dims.tied,
        attention_bias=False,
        mlp_bias=False,
    )
    # transformers >= 4.56 calls it "dtype", older versions "torch_dtype": the installed name.
    major_minor = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    cfg["dtype" if major_minor >= (4, 56) else "torch_dtype"] = dtype_name(dtype)
    archs = source.get("architectures") or ["LlamaForCausalLM"]
    family = next((FAMILIES[a][0] for a in archs if a in FAMILIES), "llama")
    if mod is None:
        if family == "llama_mod":  # a dense export of a MoD model is a plain LLaMA
            family = "llama"
        if family == "llama":
            for key in _WINDOW_KEYS:
                cfg.pop(key, None)
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}.get(
            family, "Qwen2ForCausalLM"
        )
        cfg.update(model_type=family, architectures=[arch])
        if family == "qwen2":
            cfg.pop("attention_bias", None)
            cfg.pop("mlp_bias", None)
    else:
        for key in _WINDOW_KEYS:
            cfg.pop(key, None)
        cfg.update(
            model_type="llama_mod",
            architectures=["LlamaModForCausalLM"],
            auto_map=dict(MOD_AUTO_MAP),
            attention_qkv_bias=dims.qkv_bias,
            mod_routing=mod.routing,
            mod_threshold=mod.threshold,
            mod_capacity=mod.capacity,
            mod_gate=mod.gate,
            mod_routed_layers=mod.routed_layer_indices(dims.num_layers),
            mod_router_input=mod.router_input,
            mod_keep_first_token=mod.keep_first_token,
            mod_skipped_kv=mod.skipped_kv,
            mod_layer_thresholds={str(k): v for k, v in sorted(mod.layer_thresholds.items())},
        )
        if mod.topk_decode_threshold is not None:
            cfg["mod_topk_decode_threshold"] = mod.topk_decode_threshold
    cfg["transformers_version"] = transformers.__version__
    return cfg
