"""A CPU-side stand-in for CUDA's device checks: catches host tensors where a GPU run would fail.

On a CPU host the platform patches (:mod:`megatron_mod.platform`) map every CUDA placement to
the CPU, so two classes of bugs that break the first GPU run stay invisible in CPU tests:

- a tensor created on the host (``torch.zeros(1)``, ``torch.as_tensor(array)``, ``.cpu()``)
  handed to a ``torch.distributed`` collective, which NCCL refuses ("No backend type associated
  with device type cpu");
- a host tensor combined with model tensors (token ids into the embedding, a loss mask into the
  loss), which CUDA refuses ("Expected all tensors to be on the same device").

This guard tracks where each tensor *would* live on a GPU host. It runs as a
``TorchFunctionMode`` over the CPU patches and tags tensors:

- **host**: created by a factory with no ``device`` (PyTorch's default device is the CPU even on
  GPU hosts), with the literal string ``"cpu"``, or by ``.cpu()`` / ``.to("cpu")``;
- **device**: created or moved with a CUDA device, ``torch.cuda.current_device()``, or a
  ``torch.device`` object (``platform.device()``, ``x.device``), and every parameter of a
  megatron-core module (they carry ``tensor_model_parallel`` / ``sequence_parallel``);
- results of other operations inherit ``device`` from any device operand, else ``host`` from any
  host operand with at least one dimension (0-dim host tensors are legal scalars in CUDA ops).

It raises :class:`HostTensorError` when a collective receives a host tensor (except on
megatron's gloo groups, which exist for host tensors), or when an operation combines a host
tensor of at least one dimension with a device tensor. Enable it with
``MEGATRON_MOD_DEVICE_GUARD=1`` (the test suite does); it is a no-op on GPU hosts, where CUDA
itself performs these checks.

What it does not see:

- **work inside autograd ``backward``**: PyTorch runs backward functions outside any
  ``TorchFunctionMode``, so tensors created there are not tagged and mixing there is not
  checked. Collectives called there are still checked for tensors tagged in the forward.
- **``torch.device("cpu")`` objects**: on a CPU host ``platform.device()`` and ``x.device`` are
  the same object, so every ``torch.device`` counts as the compute device. Pass
  ``platform.device()`` (never a literal CPU device) where a tensor belongs on the GPU; the
  literal string ``"cpu"`` is caught.
- collectives bound to a name before :func:`install_collective_guards` ran in a module outside
  ``megatron`` (megatron's own, ``dist_all_gather_func`` and the like, are re-pointed).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

__all__ = [
    "HostTensorError",
    "DeviceGuardMode",
    "CudaStandIn",
    "guard_requested",
    "enabled",
    "is_active",
]

ENV_VAR = "MEGATRON_MOD_DEVICE_GUARD"
_TAG = "_megatron_mod_placement"
_HOST, _DEVICE = "host", "device"
_ACTIVE = 0  # how many enabled() contexts (or the process-wide guard) are active

# Operations that legitimately combine host and device tensors on a GPU: copies across devices,
# and indexing with host index tensors (PyTorch moves the indices).
_MIXING_ALLOWED = {
    torch.Tensor.to,
    torch.Tensor.copy_,
    torch.Tensor.__getitem__,
    torch.Tensor.__setitem__,
    torch.Tensor.__repr__,
    torch.Tensor.__format__,
}
_FACTORIES = {
    torch.zeros,
    torch.ones,
    torch.empty,
    torch.full,
    torch.arange,
    torch.linspace,
    torch.eye,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.randperm,
    torch.tensor,
    torch.as_tensor,
    torch.from_numpy,
}
_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "_all_gather_base",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "broadcast",
    "reduce",
    "all_to_all",
    "all_to_all_single",
    # isend/irecv stay unwrapped: P2POp checks their identity; their tensors are checked here.
    "batch_isend_irecv",
)


class HostTensorError(RuntimeError):
    """A tensor that would live on the host reached a place that needs the compute device."""


class CudaStandIn(str):
    """What ``torch.cuda.current_device()`` returns on CPU hosts: ``"cpu"``, marked as CUDA.

    It is a real ``"cpu"`` string (megatron-core passes it to ``device=`` also inside autograd
    functions, where no TorchFunctionMode runs), and the guard can still tell that the caller
    meant the compute device.
    """


def guard_requested() -> bool:
    """Whether ``MEGATRON_MOD_DEVICE_GUARD`` asks for the guard."""
    return os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")


def _is_megatron_parameter(t: torch.Tensor) -> bool:
    return isinstance(t, torch.nn.Parameter) and (
        hasattr(t, "tensor_model_parallel") or hasattr(t, "sequence_parallel")
    )


def _placement(t: torch.Tensor) -> str | None:
    tag = getattr(t, _TAG, None)
    if tag is None and _is_megatron_parameter(t):
        return _DEVICE
    return tag


def _device_intent(dev) -> str | None:
    """Where a ``device=`` argument puts a tensor on a GPU host."""
    if dev is None:
        return _HOST
    if isinstance(dev, CudaStandIn):
        return _DEVICE
    if isinstance(dev, torch.device):
        # platform.device() and x.device are torch.device objects: the caller chose a device.
        return _DEVICE
    if isinstance(dev, str):
        return _DEVICE if dev.startswith("cuda") else _HOST if dev == "cpu" else None
    if isinstance(dev, int) and not isinstance(dev, bool):
        return _DEVICE
    return None


def _caller() -> str:
    """file:line of the first frame outside torch and this module (for error messages)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if (
            f"{os.sep}torch{os.sep}" not in name
            and not name.endswith("device_guard.py")
            and not name.endswith("platform.py")
        ):
            return f"{name}:{frame.f_lineno}"
        frame = frame.f_back
    return "<unknown>"


def _tag(out, placement: str | None, origin: str | None = None) -> None:
    if placement is None:
        return
    for t in tree_flatten(out)[0]:
        if isinstance(t, torch.Tensor):
            try:
                setattr(t, _TAG, placement)
                if origin is not None:
                    t._megatron_mod_origin = origin
            except (AttributeError, RuntimeError):
                pass


def _describe(t: torch.Tensor) -> str:
    origin = getattr(t, "_megatron_mod_origin", None)
    where = f" created at {origin}" if origin else ""
    return f"a host tensor of shape {tuple(t.shape)} and dtype {t.dtype}{where}"


class DeviceGuardMode(TorchFunctionMode):
    """Tags tensors host/device and raises :class:`HostTensorError` where CUDA would fail."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        try:
            placement, origin = self._placement_of_result(func, args, kwargs)
        except HostTensorError:
            raise
        _tag(out, placement, origin)
        return out

    def _placement_of_result(self, func, args, kwargs):
        if func is torch.Tensor.cuda:
            return _DEVICE, None
        if func is torch.Tensor.cpu:
            return _HOST, _caller()
        if func is torch.Tensor.to:
            target = kwargs.get("device", args[1] if len(args) > 1 else None)
            if isinstance(target, torch.Tensor):
                return _placement(target), None
            if isinstance(target, (str, torch.device, int)) and not isinstance(target, bool):
                intent = _device_intent(target)
                return intent, (_caller() if intent == _HOST else None)
            return _placement(args[0]), None  # a dtype-only .to keeps the placement
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if func in _FACTORIES and not tensors:
            intent = _device_intent(kwargs.get("device"))
            return intent, (_caller() if intent == _HOST else None)
        if "device" in kwargs:  # *_like factories and new_* with an explicit device
            intent = _device_intent(kwargs["device"])
            if kwargs["device"] is not None:
                return intent, (_caller() if intent == _HOST else None)
        placements = [(_placement(t), t) for t in tensors]
        device_operand = any(p == _DEVICE for p, _ in placements)
        host_operands = [t for p, t in placements if p == _HOST and t.dim() > 0]
        if device_operand and host_operands and func not in _MIXING_ALLOWED:
            name = getattr(func, "__name__", repr(func))
            raise HostTensorError(
                f"{name} combines {_describe(host_operands[0])} with tensors on the compute "
                "device; on a GPU this fails with a device mismatch. Create it with "
                "device=megatron_mod.platform.device() or move it with .to(device)"
            )
        if device_operand:
            return _DEVICE, None
        if host_operands:
            return _HOST, getattr(host_operands[0], "_megatron_mod_origin", None)
        return None, None


def _gloo_groups() -> list:
    """megatron's process groups that are gloo by design (they carry host tensors)."""
    from megatron.core import parallel_state

    groups = []
    for name in ("_DATA_PARALLEL_GROUP_GLOO", "_DATA_PARALLEL_GROUP_WITH_CP_GLOO"):
        group = getattr(parallel_state, name, None)
        if group is not None:
            groups.append(group)
    return groups


def _guard_collective(name: str, collective):
    @functools.wraps(collective)
    def guarded(*args, **kwargs):
        group = kwargs.get("group")
        if _ACTIVE and (group is None or all(group is not g for g in _gloo_groups())):
            leaves = tree_flatten((args, kwargs))[0]
            leaves += [getattr(op, "tensor", None) for op in leaves if hasattr(op, "tensor")]
            for t in leaves:
                if isinstance(t, torch.Tensor) and _placement(t) == _HOST:
                    raise HostTensorError(
                        f"torch.distributed.{name} got {_describe(t)}; NCCL (the GPU backend) "
                        "refuses host tensors. Create it with "
                        "device=megatron_mod.platform.device() or move it with .to(device)"
                    )
        return collective(*args, **kwargs)

    guarded._megatron_mod_guarded = True
    return guarded


_GUARDED_BY_ORIGINAL: dict[int, object] = {}  # id(original collective) -> its guarded wrapper


def install_collective_guards() -> None:
    """Wrap ``torch.distributed``'s tensor collectives with the host-tensor check (idempotent).

    megatron-core binds some collectives to its own names at import (``dist_all_gather_func``,
    ``dist_reduce_scatter_func``: every SP gather and DDP bucket); every such name in a loaded
    ``megatron`` module is re-pointed at the guarded wrapper too.
    """
    for name in _COLLECTIVES:
        collective = getattr(torch.distributed, name, None)
        if collective is None or getattr(collective, "_megatron_mod_guarded", False):
            continue
        guarded = _guard_collective(name, collective)
        _GUARDED_BY_ORIGINAL[id(collective)] = guarded
        setattr(torch.distributed, name, guarded)
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith("megatron."):
            continue
        for attr, value in list(vars(module).items()):
            guarded = _GUARDED_BY_ORIGINAL.get(id(value))
            if guarded is not None and callable(value):
                setattr(module, attr, guarded)


def is_active() -> bool:
    """Whether the guard is checking right now."""
    return _ACTIVE > 0


def enter_process_wide() -> DeviceGuardMode:
    """Switch the guard on until :func:`leave_process_wide` (``MEGATRON_MOD_DEVICE_GUARD=1``)."""
    global _ACTIVE
    install_collective_guards()
    mode = DeviceGuardMode()
    mode.__enter__()
    _ACTIVE += 1
    return mode


def leave_process_wide(mode: DeviceGuardMode) -> None:
    """Undo :func:`enter_process_wide`."""
    global _ACTIVE
    mode.__exit__(None, None, None)
    _ACTIVE -= 1


@contextlib.contextmanager
def enabled():
    """Check host/device placement inside this block (CPU hosts only; a no-op with CUDA)."""
    global _ACTIVE
    if torch.cuda.is_available():
        yield
        return
    install_collective_guards()
    _ACTIVE += 1
    try:
        with DeviceGuardMode():
            yield
    finally:
        _ACTIVE -= 1
