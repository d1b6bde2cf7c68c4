"""Tiny megatron-core models and routed layers for the MoD core's unit tests."""

from __future__ import annotations

import torch

VOCAB = 96
"""Vocabulary of the tiny models."""
SEQ = 24
"""Default sequence length of a test batch."""
DEVICE = torch.device("cpu")
"""Tests run on CPU; an explicit device keeps the device guard satisfied."""


def tiny_config(**overrides):
    """The tiny LLaMA TransformerConfig (megatron_mod.models.llama_config("tiny")), overridden."""
    from megatron_mod.models import llama_config

    return llama_config("tiny", **overrides)


def build_model(mod_config, seed=7, **overrides):
    """A tiny GPTModel (dense when ``mod_config`` is None), seeded."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_mod.models import build_gpt_model

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return build_gpt_model(tiny_config(**overrides), mod_config, vocab_size=VOCAB, max_seq_len=64)


def copy_dense_weights(dense, mod_model):
    """Load a dense model's weights into a MoD model (only the routers are left out)."""
    missing, unexpected = mod_model.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected
    assert all(".router." in k for k in missing), missing


def random_batch(batch=3, seq=SEQ, seed=0):
    """(tokens, positions) ``[batch, seq]`` on the compute device."""
    from megatron_mod import platform

    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, seq), generator=gen)
    positions = torch.arange(seq)[None].expand(batch, -1)
    return tokens.to(platform.device()), positions.to(platform.device())


def routed_layers(model):
    """The model's MoDTransformerLayers, in order."""
    from megatron_mod.layer import MoDTransformerLayer

    return [m for m in model.decoder.layers if isinstance(m, MoDTransformerLayer)]


def randomise_routers(model, std=1.0, bias=0.0, seed=3):
    """Random router weights (``std``) and a constant bias, so routing skips some tokens."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in routed_layers(model):
            w = torch.randn(layer.router.weight.shape, generator=gen) * std
            layer.router.weight.copy_(w)
            layer.router.bias.fill_(bias)


def layer_and_rope(mod_config, seq):
    """One routed layer built from the MoD spec, its rotary table for ``seq``, and its config."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.spec_utils import build_module

    from megatron_mod.specs import get_mod_layer_spec

    torch.manual_seed(11)
    model_parallel_cuda_manual_seed(11)
    config = tiny_config()
    layer = build_module(get_mod_layer_spec(mod_config), config=config, layer_number=1)
    rope = RotaryEmbedding(kv_channels=config.kv_channels, rotary_percent=1.0, rotary_base=10000)(
        seq
    )
    return layer, rope, config
