"""megatron_mod.serving: serving a ``llama_mod`` export in an inference engine (vLLM).

``vllm_plugin.register`` is the ``vllm.general_plugins`` entry point; ``vllm_model`` holds the
model vLLM runs and ``vllm_kv`` the per-layer KV planning of routed layers (docs/serving.md).
Nothing here is imported by training or conversion.
"""
