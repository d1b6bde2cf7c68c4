"""megatron_mod.hf."""
