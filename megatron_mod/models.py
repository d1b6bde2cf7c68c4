"""LLaMA-family presets as megatron-core TransformerConfigs, and the GPT model builder."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_mod.config import MoDConfig
from megatron_mod.specs import get_decoder_block_spec

__all__ = ["LlamaTransformerConfig", "PRESETS", "llama_config", "build_gpt_model"]


@dataclass
class LlamaTransformerConfig(TransformerConfig):
    """megatron-core TransformerConfig plus the LLaMA facts GPTModel takes as arguments."""

    rotary_base: float = 10000.0
    """RoPE theta (10000 for LLaMA-2, 500000 for LLaMA-3.x); kept exact, fractions included."""

    rope_scaling: bool = False
    """LLaMA-3.x RoPE frequency scaling (megatron-core's: low 1, high 4, original 8192)."""

    rope_scaling_factor: float = 8.0
    """LLaMA-3.x RoPE scaling factor (8 for 3.1, 32 for 3.2); used when ``rope_scaling``."""

    share_embeddings_and_output_weights: bool = False
    """Tied input embedding and output layer (SmolLM2, LLaMA-3.2 1B/3B, small Qwen2.5)."""

    preset: str = "custom"
    """Name of the preset this config came from (for logs and checkpoint metadata)."""

    def __post_init__(self):
        super().__post_init__()
        if not self.rotary_base > 0:
            raise ValueError(f"rotary_base={self.rotary_base} must be positive")
        if self.rope_scaling and not self.rope_scaling_factor >= 1.0:
            raise ValueError(f"rope_scaling_factor={self.rope_scaling_factor} must be >= 1")


# Shapes from the published configs. vocab/sequence length are model-builder arguments.
PRESETS: dict[str, dict] = {
    "tiny": dict(
        num_layers=4,
        hidden_size=64,
        num_attention_heads=8,
        num_query_groups=2,
        ffn_hidden_size=176,
        layernorm_epsilon=1e-5,
    ),
    "minima-2-3b": dict(
        num_layers=24,
        hidden_size=3072,
        num_attention_heads=24,
        num_query_groups=24,
        ffn_hidden_size=8192,
        layernorm_epsilon=1e-6,
    ),
    "llama2-7b": dict(
        num_layers=32,
        hidden_size=4096,
        num_attention_heads=32,
        num_query_groups=32,
        ffn_hidden_size=11008,
        layernorm_epsilon=1e-5,
    ),
    "llama2-13b": dict(
        num_layers=40,
        hidden_size=5120,
        num_attention_heads=40,
        num_query_groups=40,
        ffn_hidden_size=13824,
        layernorm_epsilon=1e-5,
    ),
    "llama2-70b": dict(
        num_layers=80,
        hidden_size=8192,
        num_attention_heads=64,
        num_query_groups=8,
        ffn_hidden_size=28672,
        layernorm_epsilon=1e-5,
    ),
}


def _check_parallel_divisibility(values: dict) -> None:
    tp = values.get("tensor_model_parallel_size", 1)
    pp = values.get("pipeline_model_parallel_size", 1)
    heads = values["num_attention_heads"]
    groups = values.get("num_query_groups") or heads
    checks = [
        ("num_attention_heads", heads, tp, "tensor_model_parallel_size"),
        ("num_query_groups", groups, tp, "tensor_model_parallel_size"),
        ("num_layers", values["num_layers"], pp, "pipeline_model_parallel_size"),
    ]
    for field, value, size, size_name in checks:
        if size < 1 or value % size != 0:
            divisors = [d for d in range(1, value + 1) if value % d == 0]
            raise ValueError(
                f"{size_name}={size} does not divide {field}={value}; "
                f"allowed {size_name} values: {divisors}"
            )
    if heads % groups != 0:
        raise ValueError(f"num_query_groups={groups} must divide num_attention_heads={heads} (GQA)")
    if values.get("sequence_parallel") and tp == 1:
        raise ValueError("sequence_parallel=True needs tensor_model_parallel_size > 1")


def llama_config(preset: str, **overrides) -> LlamaTransformerConfig:
    """A megatron-core TransformerConfig for a LLaMA-family model.

    LLaMA architecture facts (RMSNorm, SwiGLU, RoPE, no biases, no dropout) are fixed; the parallel
    layout defaults to the current megatron parallel state when it is initialised.

    Args:
        preset: one of :data:`PRESETS` (``tiny``, ``minima-2-3b``, ``llama2-7b``, ``llama2-13b``,
            ``llama2-70b``).
        **overrides: any TransformerConfig / LlamaTransformerConfig field.

    Raises:
        ValueError: unknown preset or field, or a parallel size that does not divide the model.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    cpu = not torch.cuda.is_available()
    values = dict(
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        use_cpu_initialization=cpu,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        rotary_base=10000.0,
        preset=preset,
    )
    if parallel_state.model_parallel_is_initialized():
        values["tensor_model_parallel_size"] = parallel_state.get_tensor_model_parallel_world_size()
        values["pipeline_model_parallel_size"] = (
            parallel_state.get_pipeline_model_parallel_world_size()
        )
    values.update(PRESETS[preset])
    known = {f.name for f in dataclasses.fields(LlamaTransformerConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown TransformerConfig fields {unknown} in llama_config overrides")
    values.update(overrides)
    if values.get("bf16"):
        if "params_dtype" not in overrides:
            values["params_dtype"] = torch.bfloat16
        values["pipeline_dtype"] = torch.bfloat16
    _check_parallel_divisibility(values)
    return LlamaTransformerConfig(**values)


def build_gpt_model(
    transformer_config: TransformerConfig,
    mod_config: MoDConfig | None,
    vocab_size: int,
    max_seq_len: int,
    use_transformer_engine: bool | None = None,
    vp_stage: int | None = None,
) -> GPTModel:
    """Build this pipeline stage's GPTModel; routed layers per ``mod_config``.

    ``mod_config=None`` builds megatron-core's plain dense GPTModel (the reference model).
    Embeddings and output layer are untied as in LLaMA-2 unless the config sets
    ``share_embeddings_and_output_weights`` (megatron-core then keeps one matrix; under
    pipeline parallelism the last stage holds a copy whose gradient megatron-core's
    ``finalize_model_grads`` all-reduces with the first stage's). RoPE uses the config's
    ``rotary_base``, ``rope_scaling`` and ``rope_scaling_factor`` when it carries them.

    Args:
        transformer_config: from :func:`llama_config` (or any megatron TransformerConfig).
        mod_config: routing settings, or ``None`` for dense.
        vocab_size: padded vocabulary size (divisible by TP).
        max_seq_len: longest sequence the model will see.
        use_transformer_engine: force TE or local layer specs (default: TE when importable).
        vp_stage: virtual pipeline stage, if any.
    """
    tp = transformer_config.tensor_model_parallel_size
    if vocab_size % tp != 0:
        raise ValueError(
            f"vocab_size={vocab_size} must be divisible by tensor_model_parallel_size={tp}; pad it "
            "(see megatron_mod.hf.mapping.padded_vocab_size)"
        )
    block_spec = get_decoder_block_spec(
        transformer_config, mod_config, use_transformer_engine, vp_stage=vp_stage
    )
    return GPTModel(
        config=transformer_config,
        transformer_layer_spec=block_spec,
        vocab_size=vocab_size,
        max_sequence_length=max_seq_len,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=bool(
            getattr(transformer_config, "share_embeddings_and_output_weights", False)
        ),
        position_embedding_type="rope",
        rotary_base=getattr(transformer_config, "rotary_base", 10000),
        rope_scaling=bool(getattr(transformer_config, "rope_scaling", False)),
        rope_scaling_factor=float(getattr(transformer_config, "rope_scaling_factor", 8.0)),
        vp_stage=vp_stage,
    )
