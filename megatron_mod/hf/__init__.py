"""megatron_mod.hf: HF LLaMA <-> megatron-mod conversion and the HF Mixture-of-Depths model."""


def register_llama_mod() -> None:
    """Register ``llama_mod`` with ``AutoConfig`` / ``AutoModelForCausalLM`` (idempotent).

    Exported checkpoints load without this (``trust_remote_code=True`` uses their copied
    modeling files); it lets ``AutoModelForCausalLM.from_config`` and local code build the model.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from .configuration_llama_mod import LlamaModConfig
    from .modeling_llama_mod import LlamaModForCausalLM

    AutoConfig.register("llama_mod", LlamaModConfig, exist_ok=True)
    AutoModelForCausalLM.register(LlamaModConfig, LlamaModForCausalLM, exist_ok=True)
