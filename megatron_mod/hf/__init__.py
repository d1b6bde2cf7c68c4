"""megatron_mod.hf: HF LLaMA <-> megatron-mod conversion and the HF Mixture-of-Depths model."""


def register_llama_mod() -> None:
    """Register ``llama_mod`` with ``AutoConfig`` / ``AutoModelForCausalLM`` (idempotent).

    Importing ``megatron_mod.hf.modeling_llama_mod`` does the same. Exported checkpoints load
    without it (``trust_remote_code=True`` uses their copied modeling files); it lets
    ``AutoConfig.for_model("llama_mod")`` and ``AutoModelForCausalLM.from_config`` build the model.
    """
    from . import modeling_llama_mod

    modeling_llama_mod._register_auto_classes()
