"""Layer and block specs: megatron-core's own dense layer specs, with routed layers swapped in.

A routed layer reuses the dense layer's submodules unchanged (so parameter names match the dense
model) and only changes the module class to :class:`~megatron_mod.layer.MoDTransformerLayer`.
The Transformer Engine spec is used when ``transformer_engine`` imports; otherwise the local
(pure megatron-core / torch) spec, whose torch norm is replaced by one that supports sequence
parallelism (megatron's fallback ``WrappedTorchNorm`` refuses it).
"""

from __future__ import annotations

import copy
import importlib.util

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_mod.config import MoDConfig
from megatron_mod.layer import MoDTransformerLayer

__all__ = [
    "TorchNorm",
    "have_transformer_engine",
    "get_dense_layer_spec",
    "get_mod_layer_spec",
    "get_decoder_block_spec",
]


def have_transformer_engine() -> bool:
    """Whether Transformer Engine is importable (it never is on CPU-only hosts)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # a broken TE install must not break the torch fallback
        return False
    return True


class TorchNorm:
    """torch LayerNorm/RMSNorm builder that also works under sequence parallelism.

    Under SP each rank normalises its own sequence shard, so the weight's gradient is partial and
    must be summed across TP; megatron-core does that for parameters flagged ``sequence_parallel``.
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        else:
            raise ValueError(
                f"TransformerConfig.normalization={config.normalization!r} is not supported; "
                "use 'RMSNorm' or 'LayerNorm'"
            )
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def _replace_torch_norms(spec: ModuleSpec) -> ModuleSpec:
    spec = copy.deepcopy(spec)
    sub = spec.submodules
    for name in ("input_layernorm", "pre_mlp_layernorm"):
        if getattr(sub, name, None) is WrappedTorchNorm:
            setattr(sub, name, TorchNorm)
    return spec


def get_dense_layer_spec(use_transformer_engine: bool | None = None) -> ModuleSpec:
    """megatron-core's GPT layer spec for a LLaMA layer (RMSNorm, SwiGLU, no biases).

    Args:
        use_transformer_engine: force the TE (True) or local (False) spec; ``None`` picks TE
            when it is importable.
    """
    if use_transformer_engine is None:
        use_transformer_engine = have_transformer_engine()
    if use_transformer_engine:
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec()
    return _replace_torch_norms(get_gpt_layer_local_spec(normalization="RMSNorm"))


def get_mod_layer_spec(
    mod_config: MoDConfig, use_transformer_engine: bool | None = None
) -> ModuleSpec:
    """The dense layer spec with the layer class swapped for the routed MoD layer.

    With ``mod_config.skipped_kv`` the layer's compact queries attend to every token's keys
    (``s_c != s``) under an explicit mask, so its attention is built for an ``arbitrary`` mask:
    the causal kernels (megatron's fused upper-triangular softmax, TE's causal flash path) assume
    square, aligned attention.
    """
    dense = get_dense_layer_spec(use_transformer_engine)
    params = dict(dense.params or {})
    params["mod_config"] = mod_config
    submodules = dense.submodules
    if mod_config.skipped_kv:
        submodules = copy.deepcopy(submodules)
        attention = submodules.self_attention
        attention.params = {**(attention.params or {}), "attn_mask_type": AttnMaskType.arbitrary}
    return ModuleSpec(module=MoDTransformerLayer, submodules=submodules, params=params)


def _final_norm(use_transformer_engine: bool):
    if use_transformer_engine:
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return TorchNorm


def get_decoder_block_spec(
    config: TransformerConfig,
    mod_config: MoDConfig | None,
    use_transformer_engine: bool | None = None,
    vp_stage: int | None = None,
) -> TransformerBlockSubmodules:
    """Per-layer specs for this pipeline stage: routed layers per ``mod_config``, others dense.

    Args:
        config: the model's transformer config (layer count, pipeline layout).
        mod_config: ``None`` gives an all-dense block.
        use_transformer_engine: see :func:`get_dense_layer_spec`.
        vp_stage: virtual pipeline stage, if any.
    """
    if use_transformer_engine is None:
        use_transformer_engine = have_transformer_engine()
    routed = set(mod_config.routed_layer_indices(config.num_layers)) if mod_config else set()
    dense_spec = get_dense_layer_spec(use_transformer_engine)
    mod_spec = get_mod_layer_spec(mod_config, use_transformer_engine) if mod_config else None
    all_specs = [mod_spec if i in routed else dense_spec for i in range(config.num_layers)]
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(
        layer_specs=all_specs[offset : offset + count],
        layer_norm=_final_norm(use_transformer_engine),
    )
