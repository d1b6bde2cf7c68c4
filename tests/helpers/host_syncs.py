"""Counting the calls that make the host wait for the device, on a CPU host."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode


class HostSyncCounter(TorchFunctionMode):
    """Counts the calls that make the host wait for a device (int/bool/item/tolist/cpu/...).

    On a GPU each of these blocks the host until the queued kernels finish; on a CPU they are
    free, so only counting shows them.
    """

    SYNCS = {
        torch.Tensor.__int__,
        torch.Tensor.__bool__,
        torch.Tensor.__float__,
        torch.Tensor.__index__,
        torch.Tensor.item,
        torch.Tensor.tolist,
        torch.Tensor.cpu,
        torch.Tensor.numpy,
        torch.Tensor.nonzero,
        torch.nonzero,
        torch.masked_select,
        torch.Tensor.masked_select,
        torch.unique,
    }

    def __init__(self):
        super().__init__()
        self.count = 0
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCS:
            self.count += 1
            self.calls.append(getattr(func, "__name__", repr(func)))
        return func(*args, **(kwargs or {}))
