"""One-call process setup: torch.distributed, megatron-core parallel state, seeds.

On a GPU host this is a thin wrapper over the usual megatron-core calls (NCCL backend,
``initialize_model_parallel``, ``model_parallel_cuda_manual_seed``). On a host without CUDA it
also applies a small set of compatibility patches so that megatron-core (which hard-codes
``"cuda"`` in a handful of places: the global memory buffer, the RNG tracker, pipeline
schedules, sequence-parallel gathers, rotary embeddings, checkpoint writers) runs on CPU with
the gloo backend. :func:`initialize` applies them and :func:`destroy` undoes them; they are never
applied when a GPU is present.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
import socket

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from megatron_mod import device_guard

__all__ = [
    "initialize",
    "destroy",
    "is_cpu_mode",
    "apply_cpu_patches",
    "remove_cpu_patches",
    "device",
]

_CPU_PATCHED = False
_GUARD_MODE = None
_CUDA_STAND_IN = device_guard.CudaStandIn("cpu")
_CPU_MODE: TorchFunctionMode | None = None


def is_cpu_mode() -> bool:
    """True when the process runs without CUDA (and therefore with the CPU patches)."""
    return not torch.cuda.is_available()


def device() -> torch.device:
    """The device model tensors live on in this process."""
    if is_cpu_mode():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _is_cuda_device(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    # megatron passes `torch.cuda.current_device()` (an int) as a device.
    return isinstance(dev, int) and not isinstance(dev, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Redirects tensor placement on CUDA to the CPU.

    megatron-core creates tensors with literal ``device="cuda"`` (or an int from
    ``torch.cuda.current_device()``) and calls ``.cuda()`` in code paths that are otherwise
    device-agnostic. Catching those at the torch-function level avoids editing megatron-core.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron-core's optimizers tell parameter dtypes apart by type string
            # ("torch.cuda.FloatTensor"); report CPU tensors under the CUDA name they stand in for.
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if name.count(".") == 1 else name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _CpuStream:
    """What ``torch.cuda.current_stream()`` returns on CPU: CPU work is already ordered."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


def _make_cpu_rng_tracker_class():
    from megatron.core.tensor_parallel import random as mcore_random

    class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
        """Megatron's RNG tracker with the same fork semantics, on the CPU generator."""

        def add(self, name, seed):
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CpuRNGStatesTracker


# megatron-core internals the CPU patches replace; checked first so that a megatron-core release
# that renamed one fails with a clear message instead of a half-patched process.
_PATCHED_MEGATRON_SYMBOLS = (
    "_CUDA_RNG_STATE_TRACKER",
    "_CUDA_RNG_STATE_TRACKER_INITIALIZED",
    "CudaRNGStatesTracker",
    "initialize_rng_tracker",
    "_get_cuda_rng_state",
    "_set_cuda_rng_state",
    "CheckpointFunction",
)
_ORIGINALS: list[tuple[object, str, object]] = []  # (owner, attribute, original value)


def _patch(owner, name: str, value) -> None:
    _ORIGINALS.append((owner, name, getattr(owner, name)))
    setattr(owner, name, value)


def _check_megatron_symbols() -> None:
    import megatron.core
    from megatron.core.tensor_parallel import random as mcore_random

    missing = [n for n in _PATCHED_MEGATRON_SYMBOLS if not hasattr(mcore_random, n)]
    if missing:
        raise RuntimeError(
            f"megatron-core {megatron.core.__version__} has no megatron.core.tensor_parallel."
            f"random.{', '.join(missing)}, which the CPU patches replace; this megatron-mod "
            "supports megatron-core 0.16-0.19 on CPU hosts (GPU hosts need no patches)"
        )


def apply_cpu_patches() -> None:
    """Make megatron-core usable on a CUDA-less host; :func:`remove_cpu_patches` undoes it.

    Idempotent, and a no-op when CUDA exists. :func:`initialize` calls it and :func:`destroy`
    undoes it. With ``MEGATRON_MOD_DEVICE_GUARD=1`` it also enters
    :class:`~megatron_mod.device_guard.DeviceGuardMode`, which fails where a GPU run would put a
    host tensor (the tests use it).
    """
    global _CPU_PATCHED, _CPU_MODE, _GUARD_MODE
    if _CPU_PATCHED or not is_cpu_mode():
        return
    _check_megatron_symbols()
    from megatron.core.tensor_parallel import random as mcore_random

    # "cpu" rather than an index: megatron passes current_device() straight into `device=`, also
    # inside autograd backward functions, where a TorchFunctionMode is not active. The string is
    # marked so that the device guard knows the caller meant the compute device.
    _patch(torch.cuda, "current_device", lambda: _CUDA_STAND_IN)
    _patch(torch.cuda, "synchronize", lambda *a, **k: None)
    _patch(torch.cuda, "manual_seed", lambda *a, **k: None)
    _patch(torch.cuda, "manual_seed_all", lambda *a, **k: None)
    # megatron-core >= 0.19's DDP orders its gradient reduction after the current stream.
    _patch(torch.cuda, "current_stream", lambda *a, **k: _CpuStream())

    tracker_cls = _make_cpu_rng_tracker_class()
    _patch(mcore_random, "_CUDA_RNG_STATE_TRACKER", tracker_cls())
    _patch(mcore_random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True)
    # `initialize_rng_tracker(force_reset=True)` would otherwise rebuild a CUDA tracker.
    original_init = mcore_random.initialize_rng_tracker

    def initialize_rng_tracker(*args, **kwargs):
        if mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED and isinstance(
            mcore_random._CUDA_RNG_STATE_TRACKER, tracker_cls
        ):
            return
        original_init(*args, **kwargs)

    _patch(mcore_random, "initialize_rng_tracker", initialize_rng_tracker)
    # Activation recomputation saves and restores the "CUDA" generator; on CPU hosts that is the
    # CPU generator, which the tracker above already stands in for.
    _patch(mcore_random, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())
    _patch(
        mcore_random,
        "_set_cuda_rng_state",
        lambda new_state, *a, **k: torch.set_rng_state(new_state),
    )
    # The recomputed forward runs inside autograd's backward, where TorchFunctionModes are not
    # active, and it allocates on "cuda" (causal masks); run it under the CPU redirection again.
    checkpoint_backward = mcore_random.CheckpointFunction.backward

    def backward_on_cpu(ctx, *args):
        with _CudaToCpuMode():
            return checkpoint_backward(ctx, *args)

    _patch(mcore_random.CheckpointFunction, "backward", staticmethod(backward_on_cpu))

    _CPU_MODE = _CudaToCpuMode()
    _CPU_MODE.__enter__()
    if device_guard.guard_requested():
        # Entered after the CPU mode, so it sees calls before their CUDA devices are rewritten.
        _GUARD_MODE = device_guard.enter_process_wide()
    _CPU_PATCHED = True


def remove_cpu_patches() -> None:
    """Undo :func:`apply_cpu_patches` (a no-op when nothing is patched)."""
    global _CPU_PATCHED, _CPU_MODE, _GUARD_MODE
    if not _CPU_PATCHED:
        return
    if _GUARD_MODE is not None:
        device_guard.leave_process_wide(_GUARD_MODE)
        _GUARD_MODE = None
    _CPU_MODE.__exit__(None, None, None)
    _CPU_MODE = None
    while _ORIGINALS:
        owner, name, original = _ORIGINALS.pop()
        setattr(owner, name, original)
    _CPU_PATCHED = False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DEFAULT_TIMEOUT_MINUTES = 30.0
"""Collective timeout: rank 0 alone builds a large blend's sample index while the rest wait."""


def _init_process_group(timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> None:
    if torch.distributed.is_initialized():
        return
    backend = "gloo" if is_cpu_mode() else "nccl"
    if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
        # Launched by torchrun (or an equivalent launcher): use its rendezvous variables.
        rank, world_size, init_method = (
            int(os.environ["RANK"]),
            int(os.environ["WORLD_SIZE"]),
            "env://",
        )
    else:
        # A plain single process still needs a 1-rank group. Its store listens on a fresh port,
        # and nothing is written to os.environ, so child processes do not inherit a busy port.
        rank, world_size, init_method = 0, 1, f"tcp://127.0.0.1:{_free_port()}"
    extra = {}
    if not is_cpu_mode():
        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(local)
        # Binds NCCL's communicator to this GPU at once (eager init): no guessing of the device
        # by the first collective, and no barrier warning about an unknown device.
        extra["device_id"] = local
    torch.distributed.init_process_group(
        backend=backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
        **extra,
    )


def initialize(
    tp: int = 1,
    pp: int = 1,
    seed: int = 1234,
    timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES,
) -> None:
    """Initialise distributed state for a megatron-core run.

    Initialises ``torch.distributed`` (gloo on CPU, NCCL on GPU; works under ``torchrun`` and as a
    plain single process), megatron-core's model-parallel groups and every RNG (Python, NumPy,
    torch and megatron's tensor-parallel tracker). On CUDA-less hosts it first applies the CPU
    compatibility patches.

    Args:
        tp: tensor-model-parallel size.
        pp: pipeline-model-parallel size.
        seed: base seed. As in Megatron-LM, pipeline stage ``r`` seeds with ``seed + 100 * r``
            (its layers' dropout must not repeat another stage's); tensor-parallel ranks derive
            their own streams from that.
        timeout_minutes: timeout of collectives (and of the first barrier).

    Raises:
        ValueError: if the world size is not divisible by ``tp * pp``.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    apply_cpu_patches()
    _init_process_group(timeout_minutes)
    world = torch.distributed.get_world_size()
    if tp < 1 or pp < 1 or world % (tp * pp) != 0:
        raise ValueError(
            f"world size {world} is not divisible by tensor_model_parallel_size ({tp}) x "
            f"pipeline_model_parallel_size ({pp}); launch tp*pp*dp processes"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
    )
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    """Tear down model-parallel state and the process group, and undo the CPU patches."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    remove_cpu_patches()
