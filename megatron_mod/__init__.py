"""megatron-mod: Mixture-of-Depths continued pretraining for LLaMA models on megatron-core."""

__version__ = "0.1.0"
