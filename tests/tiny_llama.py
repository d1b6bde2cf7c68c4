"""The tiny LLaMA shape the HF tests build with ``transformers`` (GQA: 8 heads, 2 KV groups)."""

TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
"""``LlamaConfig`` fields besides the vocabulary (head dim 8, SwiGLU width 176)."""
