"""vLLM plugin (entry point ``vllm.general_plugins``): serve ``llama_mod`` exports.

``pip install -e .`` (or the ``vllm`` extra) registers :func:`register`, which vLLM calls in every
process it starts. It

* registers ``LlamaModForCausalLM`` with vLLM's ``ModelRegistry`` (imported lazily, when a model
  of that architecture is loaded);
* registers the ``llama_mod`` config with ``transformers``' ``AutoConfig``, so an export loads
  without ``trust_remote_code``;
* adds a config hook for the architecture that runs the model eagerly (a routed layer's batch
  changes shape every step, which neither CUDA graphs nor ``torch.compile``'s static shapes can
  follow) and turns prefix caching off: a routed layer keeps its kept tokens compactly in a
  request's blocks, so a block's contents belong to that request, not to its tokens
  (docs/serving.md).
"""

from __future__ import annotations

import logging

ARCHITECTURE = "LlamaModForCausalLM"
MODEL_PATH = "megatron_mod.serving.vllm_model:LlamaModForCausalLM"

logger = logging.getLogger(__name__)


class LlamaModServingConfig:
    """vLLM config hook of ``LlamaModForCausalLM`` (``MODELS_CONFIG_MAP``)."""

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        return

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        from vllm.config.compilation import CompilationMode, CUDAGraphMode

        cache = vllm_config.cache_config
        if cache.enable_prefix_caching:
            logger.warning(
                "llama_mod: prefix caching turned off (routed layers keep their kept tokens "
                "compactly in each request's blocks, so blocks cannot be shared)"
            )
            cache.enable_prefix_caching = False
        vllm_config.model_config.enforce_eager = True
        compilation = vllm_config.compilation_config
        compilation.mode = CompilationMode.NONE
        compilation.cudagraph_mode = CUDAGraphMode.NONE
        if vllm_config.speculative_config is not None:
            raise ValueError(
                "llama_mod exports cannot be served with speculative decoding: drafts would be "
                "routed without their verification; remove --speculative-config"
            )


def register() -> None:
    """Register the MoD architecture, its config class and its config hook (idempotent)."""
    from vllm import ModelRegistry

    from megatron_mod.hf.configuration_llama_mod import LlamaModConfig

    try:
        from transformers import AutoConfig

        AutoConfig.register("llama_mod", LlamaModConfig)
    except ValueError:  # already registered
        pass
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_PATH)
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    MODELS_CONFIG_MAP[ARCHITECTURE] = LlamaModServingConfig
