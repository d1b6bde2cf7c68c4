"""Per-layer routing metrics: kept fraction F_j, mean gate G_j, load loss R_j, and c_eff.

Routed layers record one entry per micro-batch during the forward pass; the trainer reduces the
accumulated sums across pipeline stages (each layer lives on one stage) and data-parallel
replicas once per step, logs them, and clears the tracker. Values are identical on all
tensor-parallel ranks (routing is computed on the full sequence), so TP is not reduced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


class MoDMetricsTracker:
    """Accumulates routing statistics for a fixed number of layers."""

    _FIELDS = 5  # kept_fraction, mean_gate, load_loss, kth_gate sum, kth_gate count

    def __init__(self):
        self._sums: dict[int, torch.Tensor] = {}
        self._counts: dict[int, int] = {}
        self.enabled = True

    def record(
        self,
        layer_index: int,
        kept_fraction: torch.Tensor,
        mean_gate: torch.Tensor,
        load_loss: torch.Tensor,
        kth_gate: torch.Tensor | None = None,
    ) -> None:
        """Add one micro-batch's values for global 0-based ``layer_index`` (no graph kept)."""
        if not self.enabled:
            return
        has_kth = kth_gate is not None
        kth = kth_gate.detach().float() if has_kth else torch.zeros((), device=mean_gate.device)
        values = [kept_fraction, mean_gate, load_loss, kth, torch.ones_like(kth) * has_kth]
        row = torch.stack([v.detach().float() for v in values])
        if layer_index in self._sums:
            self._sums[layer_index] = self._sums[layer_index] + row.cpu()
            self._counts[layer_index] += 1
        else:
            self._sums[layer_index] = row.cpu()
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
            groups: process groups to all-reduce over (pipeline, data-parallel); ranks without a
                layer contribute zeros, so a layer's sum comes from the ranks that hold it.
            device: device for the collective buffer (the gloo/NCCL backend's device).

        Returns:
            {layer_index: LayerRoutingStats} for every layer recorded on any rank.
        """
        sums = torch.zeros(num_layers, self._FIELDS + 1, device=device or "cpu")
        for idx, row in self._sums.items():
            sums[idx, : self._FIELDS] = row.to(sums.device)
            sums[idx, self._FIELDS] = self._counts[idx]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for group in groups:
                if group is not None and torch.distributed.get_world_size(group) > 1:
                    torch.distributed.all_reduce(sums, group=group)
        out = {}
        for idx in range(num_layers):
            count = float(sums[idx, self._FIELDS])
            if count > 0:
                kept, gate, loss = (sums[idx, :3] / count).tolist()
                kth_sum, kth_count = sums[idx, 3:5].tolist()
                kth = kth_sum / kth_count if kth_count > 0 else None
                out[idx] = LayerRoutingStats(kept, gate, loss, kth)
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
