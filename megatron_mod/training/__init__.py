"""megatron_mod.training."""
