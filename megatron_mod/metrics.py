"""Per-layer routing metrics: kept fraction F_j, mean gate G_j, load loss R_j, and c_eff.

Routed layers record one entry per micro-batch during the forward pass, as device tensors (no
host synchronisation); the trainer reduces the accumulated sums across pipeline stages (each
layer lives on one stage) and data-parallel replicas with one collective per step, logs them,
and clears the tracker. Values are identical on all tensor-parallel ranks (routing is computed
on the full sequence), so TP is not reduced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_mod.router import QUANTILE_GRID

__all__ = ["LayerRoutingStats", "MoDMetricsTracker", "get_metrics_tracker"]


@dataclass
class LayerRoutingStats:
    """Step-averaged routing statistics of one routed layer."""

    kept_fraction: float
    """F_j: fraction of tokens that went through the layer."""
    mean_gate: float
    """G_j: mean router gate sigmoid(logit)."""
    load_loss: float
    """R_j = alpha_j * F_j * G_j."""
    kth_gate: float | None = None
    """Top-k only: mean smallest kept gate (the decode threshold that keeps about c)."""
    logit_quantiles: list[float] | None = None
    """Router logits' quantiles at ``QUANTILE_GRID`` even probabilities 0..1 (micro-batch mean)."""


class MoDMetricsTracker:
    """Accumulates routing statistics for a fixed number of layers."""

    _FIELDS = 5  # kept_fraction, mean_gate, load_loss, kth_gate sum, kth_gate count
    # then the logit quantiles (sum), then the count of micro-batches

    def __init__(self):
        self._sums: dict[int, torch.Tensor] = {}
        self._counts: dict[int, int] = {}
        self.enabled = True
        # Sorting every routed layer's logits costs a little on each forward: only a consumer
        # (the compute-target controller) turns it on.
        self.record_logit_quantiles = False

    def record(
        self,
        layer_index: int,
        kept_fraction: torch.Tensor,
        mean_gate: torch.Tensor,
        load_loss: torch.Tensor,
        kth_gate: torch.Tensor | None = None,
        logit_quantiles: torch.Tensor | None = None,
    ) -> None:
        """Add one micro-batch's values for global 0-based ``layer_index`` (no graph kept).

        The sums stay on the values' device: nothing here waits for the device.
        """
        if not self.enabled:
            return
        has_kth = kth_gate is not None
        kth = kth_gate.detach().float() if has_kth else torch.zeros_like(mean_gate.detach())
        values = [kept_fraction, mean_gate, load_loss, kth, torch.ones_like(kth) * has_kth]
        row = torch.stack([v.detach().float().reshape(()) for v in values])
        if logit_quantiles is None:
            quantiles = torch.full((QUANTILE_GRID,), float("nan"), device=row.device)
        else:
            quantiles = logit_quantiles.detach().float().reshape(QUANTILE_GRID)
        row = torch.cat([row, quantiles])
        if layer_index in self._sums:
            self._sums[layer_index] = self._sums[layer_index] + row
            self._counts[layer_index] += 1
        else:
            self._sums[layer_index] = row
            self._counts[layer_index] = 1

    def clear(self) -> None:
        """Forget everything recorded (call once per step after logging)."""
        self._sums.clear()
        self._counts.clear()

    def summary(
        self, num_layers: int, groups: tuple | list = (), device: torch.device | None = None
    ) -> dict[int, LayerRoutingStats]:
        """Per-layer micro-batch averages, summed over the given process groups.

        Args:
            num_layers: total layers in the model (all pipeline stages).
            groups: process groups to all-reduce over (pipeline and data-parallel, or the whole
                world: tensor-parallel ranks record identical values and counts, so the
                averages are the same); ranks without a layer contribute zeros.
            device: device for the collective buffer (the compute device,
                ``megatron_mod.platform.device()``; default: where the records are, else that).

        Returns:
            {layer_index: LayerRoutingStats} for every layer recorded on any rank.
        """
        if device is None:
            from megatron_mod import platform

            first = next(iter(self._sums.values()), None)
            device = first.device if first is not None else platform.device()
        width = self._FIELDS + QUANTILE_GRID
        sums = torch.zeros(num_layers, width + 1, device=device)
        if self._sums:
            index = torch.tensor(sorted(self._sums), device=device)
            rows = torch.stack([self._sums[i].to(device) for i in sorted(self._sums)])
            counts = torch.tensor(
                [float(self._counts[i]) for i in sorted(self._sums)], device=device
            )
            sums[index] = torch.cat([rows, counts[:, None]], dim=1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for group in groups:
                if group is not None and torch.distributed.get_world_size(group) > 1:
                    torch.distributed.all_reduce(sums, group=group)
        out = {}
        for idx, row in enumerate(sums.tolist()):  # one device-to-host copy
            count = row[width]
            if count > 0:
                kept, gate, loss = (v / count for v in row[:3])
                kth_sum, kth_count = row[3:5]
                kth = kth_sum / kth_count if kth_count > 0 else None
                quantiles = [v / count for v in row[self._FIELDS : width]]
                if any(math.isnan(v) for v in quantiles):
                    quantiles = None
                out[idx] = LayerRoutingStats(kept, gate, loss, kth, quantiles)
        return out

    @staticmethod
    def effective_capacity(stats: dict[int, LayerRoutingStats], num_layers: int) -> float:
        """c_eff: mean computed fraction over all layers, dense layers counting 1."""
        routed = sum(s.kept_fraction for s in stats.values())
        return (routed + (num_layers - len(stats))) / num_layers


_TRACKER = MoDMetricsTracker()


def get_metrics_tracker() -> MoDMetricsTracker:
    """The process-wide tracker the MoD layers record into."""
    return _TRACKER
