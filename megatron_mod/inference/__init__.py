"""megatron_mod.inference."""
