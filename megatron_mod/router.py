"""MoD router: one logit per token, threshold-p / top-k selection, and the load-reducing loss.

Modelled on megatron-core's MoE router: an fp32 linear map of the hidden state, replicated on
every tensor-parallel rank and marked ``sequence_parallel`` (like the norms) so that under
sequence parallelism its gradient, computed on each rank's sequence shard, is summed across TP.
The load loss is attached to the layer output with megatron-core's ``MoEAuxLossAutoScaler`` so
that it needs no change to the loss function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_mod.config import MoDConfig

__all__ = [
    "MoDRouter",
    "QUANTILE_GRID",
    "gate_threshold_logit",
    "logit_quantiles",
    "RoutingDecision",
    "select_tokens",
    "load_reducing_loss",
    "attach_load_loss",
    "set_load_loss_scale",
]


class MoDRouter(MegatronModule):
    """Linear(hidden -> 1) in fp32: ``logit = w . h + b`` for every token.

    Args:
        config: the model's transformer config (hidden size, sequence parallelism, device).
        mod_config: MoD settings (router initialisation).
    """

    def __init__(self, config: TransformerConfig, mod_config: MoDConfig):
        super().__init__(config=config)
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(
            torch.empty(1, config.hidden_size, dtype=torch.float32, device=device)
        )
        self.bias = torch.nn.Parameter(torch.empty(1, dtype=torch.float32, device=device))
        self.mod_config = mod_config
        self.eps = config.layernorm_epsilon
        self.reset_parameters()
        # Replicated across TP; under SP each rank sees a sequence shard, so grads must be summed
        # across TP exactly like layer-norm weights (megatron's DDP/finalize_model_grads does it).
        for param in (self.weight, self.bias):
            param.sequence_parallel = config.sequence_parallel

    def reset_parameters(self) -> None:
        """Small normal weights and a positive bias: every token starts kept with a margin.

        The weight std is divided by sqrt(hidden) so that the logit's spread is
        ``router_init_std`` times the RMS of the hidden state whatever the model width: a
        pretrained model's residual stream has RMS of several units in its upper layers, and
        an unscaled std of 0.02 at hidden 8192 would already skip tokens at random.
        """
        with torch.no_grad():
            if self.mod_config.router_init_std > 0:
                std = self.mod_config.router_init_std / math.sqrt(self.weight.shape[-1])
                self.weight.normal_(0.0, std)
            else:
                self.weight.zero_()
            self.bias.fill_(self.mod_config.router_init_bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Router logits in fp32.

        With ``router_input="rms_normed"`` the router reads ``h / rms(h)`` (no learned scale):
        a pretrained residual stream's RMS differs by orders of magnitude between layers and is
        largest at the first token, so on the raw ``h`` one learning rate moves some layers'
        logits hundreds of times further than others'.

        Args:
            hidden_states: [s, b, h] layer input (any dtype).

        Returns:
            logits: [s, b] float32.
        """
        # The parameters are fp32, but a wrapper such as Megatron-LM's Float16Module casts the
        # whole model to bf16/fp16; routing stays in fp32 either way, as megatron's MoE gating does.
        weight, bias = self.weight.float(), self.bias.float()
        x = hidden_states.float()
        if self.mod_config.router_input == "rms_normed":
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return torch.nn.functional.linear(x, weight, bias).squeeze(-1)


@dataclass
class RoutingDecision:
    """Which tokens a routed layer computes, and their gates."""

    keep: torch.Tensor
    """[s, b] bool: True where the token goes through the layer."""

    gates: torch.Tensor
    """[s, b] float32: g = sigmoid(logit), with gradient to the router."""

    kth_gate: torch.Tensor | None = None
    """Top-k only: the smallest kept gate per sequence, averaged over the batch (no gradient).

    Token-by-token decoding cannot rank a sequence it has not seen yet; a threshold at this
    value keeps about the same fraction, so training records it for the exported model.
    """


# Probabilities at which each routed layer records the quantiles of its logits (every 1/256).
QUANTILE_GRID = 257


def gate_threshold_logit(p: float) -> float:
    """The logit at which sigmoid reaches ``p`` (float64; -inf for 0, +inf for 1).

    Threshold routing compares logits with this value rather than gates with ``p``: a gate
    rounds to exactly 0 or 1 in fp32 beyond |logit| ~ 17, a logit does not, so a threshold
    steered far into a tail still separates tokens.
    """
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    return math.log(p) - math.log1p(-p)


def logit_quantiles(logits: torch.Tensor, points: int = QUANTILE_GRID) -> torch.Tensor:
    """Quantiles of ``logits`` at ``points`` evenly spaced probabilities 0..1 (no gradient).

    Sorting instead of ``torch.quantile`` (which refuses inputs over 16M elements); stays on the
    logits' device.
    """
    flat = logits.detach().float().reshape(-1).sort().values
    position = torch.linspace(0, flat.numel() - 1, points, device=flat.device)
    low = position.floor().long()
    high = position.ceil().long()
    weight = position - low
    return flat[low] * (1 - weight) + flat[high] * weight


def select_tokens(
    logits: torch.Tensor, mod_config: MoDConfig, layer_index: int | None = None
) -> RoutingDecision:
    """Turn router logits into a keep mask.

    threshold-p keeps ``g >= p`` token by token (causal by construction), with the layer's own
    threshold when ``mod_config.layer_thresholds`` has one, and always keeps the first token of
    each sequence when ``keep_first_token`` is set: the attention sink, whose residual stream
    every later token's attention relies on. top-k keeps the ``ceil(c * S)`` largest logits of
    each sequence (the original MoD baseline; not causal).

    Args:
        logits: [s, b] router logits for the whole sequence.
        mod_config: routing mode, thresholds and capacity.
        layer_index: global 0-based index of the routed layer (for per-layer thresholds).
    """
    gates = torch.sigmoid(logits)
    if mod_config.routing == "threshold":
        p = mod_config.threshold if layer_index is None else mod_config.layer_threshold(layer_index)
        keep = logits.detach() >= gate_threshold_logit(p)
        if mod_config.keep_first_token:
            keep[0] = True
    else:
        seq_len = logits.shape[0]
        k = min(seq_len, max(1, math.ceil(mod_config.capacity * seq_len)))
        top_logits, top = torch.topk(logits.detach(), k, dim=0)
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(0, top, True)
        return RoutingDecision(
            keep=keep, gates=gates, kth_gate=torch.sigmoid(top_logits[-1]).mean()
        )
    return RoutingDecision(keep=keep, gates=gates)


def load_reducing_loss(
    decision: RoutingDecision, coeff: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's term of R = alpha * sum_j F_j * G_j.

    Args:
        decision: the layer's routing (all tokens of the micro-batch, full sequence).
        coeff: alpha for this layer.

    Returns:
        (loss, kept_fraction F_j without gradient, mean_gate G_j with gradient).
    """
    kept_fraction = decision.keep.float().mean()
    mean_gate = decision.gates.mean()
    return coeff * kept_fraction * mean_gate, kept_fraction, mean_gate


def attach_load_loss(output: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """Make ``loss`` contribute its gradient when ``output`` is back-propagated."""
    return MoEAuxLossAutoScaler.apply(output, loss)


def set_load_loss_scale(num_microbatches: int, grad_scale: float = 1.0) -> None:
    """Set the backward scale of the load loss to match the main loss.

    megatron-core's pipeline schedule sets this scale only for MoE models (``num_moe_experts``),
    and otherwise the load-loss gradient would not be divided by the number of micro-batches.
    Call this before each ``forward_backward_func`` call (the trainer does).

    Args:
        num_microbatches: micro-batches accumulated in the step.
        grad_scale: the main loss's scale (mixed-precision loss scaling), 1.0 in fp32/bf16.
    """
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(grad_scale / num_microbatches))
