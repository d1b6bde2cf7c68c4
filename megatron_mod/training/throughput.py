"""Model FLOPs per token of a (MoD) LLaMA and the GPU peaks that MFU is measured against.

MFU counts only the work a MoD model does: a routed layer computes the fraction of tokens it
keeps, so the transformer-layer FLOPs of a step are ``tokens x c_eff x num_layers x`` the FLOPs
of one (token, layer) pair. The pair's FLOPs are the projections (2 FLOPs per weight) plus the
causal attention scores over the full sequence; a routed layer attends among kept tokens only,
so this counts its attention generously at c < 1 (the projections dominate at LLaMA shapes).
Training is 3x the forward pass (recomputation is overhead, not model FLOPs, as in Megatron-LM).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ModelFlops", "gpu_peak_flops"]

# Dense bf16 tensor-core peaks (FLOP/s) by device-name substring, most specific first.
_BF16_PEAKS = (
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("H200", 989e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("A10G", 125e12),
)


def gpu_peak_flops(bf16: bool) -> float | None:
    """This GPU's dense bf16 peak in FLOP/s, or None (no GPU, fp32 run, unknown device)."""
    if not bf16 or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in _BF16_PEAKS:
        if key in name:
            return peak
    return None


@dataclass(frozen=True)
class ModelFlops:
    """Forward FLOPs of one token through the model's pieces."""

    num_layers: int
    """Transformer layers."""
    layer_flops_per_token: float
    """Forward FLOPs of one (token, layer) pair: projections, MLP and attention scores."""
    head_flops_per_token: float
    """Forward FLOPs of the output layer (logits) per token."""
    peak_flops: float | None = None
    """Peak FLOP/s of one device (None: no MFU)."""

    @classmethod
    def from_config(cls, config, vocab_size: int, seq_length: int) -> ModelFlops:
        """From a megatron-core TransformerConfig of a LLaMA (GQA, SwiGLU) model.

        Args:
            config: the TransformerConfig (``bf16`` decides the peak used for MFU).
            vocab_size: rows of the output layer (padded vocabulary).
            seq_length: tokens per sequence (attention-score FLOPs grow with it).
        """
        h = config.hidden_size
        head_dim = config.kv_channels or h // config.num_attention_heads
        q_dim = config.num_attention_heads * head_dim
        kv_dim = (config.num_query_groups or config.num_attention_heads) * head_dim
        ffn = config.ffn_hidden_size
        mlp_mats = 3 if config.gated_linear_unit else 2
        weights = h * (q_dim + 2 * kv_dim) + q_dim * h + mlp_mats * h * ffn
        # QK^T and AV over the causal prefix (s/2 keys on average): 2 x 2 x q_dim x s/2.
        attention = 2 * q_dim * seq_length
        return cls(
            num_layers=config.num_layers,
            layer_flops_per_token=2.0 * weights + attention,
            head_flops_per_token=2.0 * h * vocab_size,
            peak_flops=gpu_peak_flops(bool(config.bf16)),
        )

    def peak_flops_per_device(self) -> float | None:
        """Peak FLOP/s of one device, or None when MFU is not measured."""
        return self.peak_flops

    def training_flops_per_token(self, c_eff: float) -> float:
        """Forward + backward FLOPs per token at effective capacity ``c_eff``."""
        forward = c_eff * self.num_layers * self.layer_flops_per_token + self.head_flops_per_token
        return 3.0 * forward
