"""Model FLOPs for MFU count only the (token, layer) pairs a MoD model computes."""

from __future__ import annotations

import pytest

from megatron_mod.models import llama_config
from megatron_mod.training.throughput import ModelFlops, gpu_peak_flops


def test_llama2_7b_flops_per_token_match_the_6n_rule():
    config = llama_config("llama2-7b")
    flops = ModelFlops.from_config(config, vocab_size=32000, seq_length=4096)
    # Weights a token passes through: 32 layers (q, k, v, o and SwiGLU) and the output layer.
    layer_weights = 4 * 4096 * 4096 + 3 * 4096 * 11008
    n = 32 * layer_weights + 4096 * 32000
    attention = 3 * 32 * 2 * 4096 * 4096  # QK^T and AV over the causal half, fwd + bwd
    assert flops.training_flops_per_token(1.0) == pytest.approx(6 * n + attention)
    assert gpu_peak_flops(bf16=True) is None or gpu_peak_flops(bf16=True) > 1e14


def test_mod_counts_only_computed_layers():
    config = llama_config("tiny", num_layers=8, hidden_size=256, ffn_hidden_size=704)
    flops = ModelFlops.from_config(config, vocab_size=1000, seq_length=128)
    head = 3 * flops.head_flops_per_token
    full = flops.training_flops_per_token(1.0) - head
    # Half the (token, layer) pairs computed: half the transformer FLOPs, the same head.
    assert flops.training_flops_per_token(0.5) - head == pytest.approx(full / 2)
    assert flops.training_flops_per_token(0.0) == pytest.approx(head)
