"""megatron_mod.data."""
