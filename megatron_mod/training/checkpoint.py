"""Training checkpoints: everything a run needs to continue exactly where it stopped.

A training checkpoint is an ordinary megatron-mod checkpoint iteration (``iter_{N:07d}``, a
megatron-core ``torch_dist`` dist checkpoint, see :mod:`megatron_mod.checkpointing`) holding,
besides the model:

* ``optimizer``: the Megatron optimizer's ``sharded_state_dict`` (Adam moments, fp32 main
  weights of bf16 parameters, the step), keyed by model parameter so it loads under any layout;
  with the distributed optimizer each data-parallel rank writes its own shard
  (``dp_reshardable``: loads under another DP size) or, with ``optimizer_format=
  "fully_reshardable"``, DP rank 0 writes it per parameter (loads under any layout);
* ``rng_state``: one ``ShardedObject`` per rank (Python, NumPy, torch CPU and CUDA generators
  and megatron's tensor-parallel RNG tracker), restored when the layout is unchanged;
* ``train_state.json``: iteration, consumed samples, skipped iterations, the LR scheduler's
  ``state_dict``, the layout, any MoD controller state and the run's arguments; it is what
  marks an iteration as a training checkpoint, and it is read before anything heavy happens.

Saving goes through :func:`~megatron_mod.checkpointing.save_model_checkpoint`: written under a
hidden temporary name, fsynced, renamed, and only then ``latest`` moved, so a process killed at
any moment leaves the previous checkpoint loadable. :func:`clean_stale` removes what such a kill
leaves behind; :func:`prune` keeps the newest ``--keep-last`` training iterations.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "TRAIN_STATE_FILENAME",
    "TrainState",
    "find_training_checkpoint",
    "read_train_state",
    "save_training_checkpoint",
    "load_training_checkpoint",
    "clean_stale",
    "prune",
    "training_iterations",
]

TRAIN_STATE_FILENAME = "train_state.json"
TRAIN_STATE_VERSION = 1
# The distributed optimizer's checkpoint formats (megatron-core names): ``dp_reshardable`` saves
# each rank's buffers as they are (fully parallel, no gather; loads under another DP size only),
# ``fully_reshardable`` gathers them per parameter on DP rank 0 (loads under any layout).
OPTIMIZER_FORMATS = ("dp_reshardable", "fully_reshardable")
_ITER_RE = re.compile(r"^iter_(\d{7})$")


@dataclass
class TrainState:
    """The small, JSON part of a training checkpoint (``train_state.json``)."""

    iteration: int
    """Optimizer steps done."""
    consumed_samples: int
    """Training samples read (the data position to continue from)."""
    scheduler: dict[str, Any]
    """``OptimizerParamScheduler.state_dict()``."""
    args: dict[str, Any]
    """The run's command-line arguments (resume refuses meaning-changing differences)."""
    layout: dict[str, Any]
    """TP, PP, DP sizes and the optimizer kind of the saving run."""
    skipped_iterations: int = 0
    """Steps whose update was skipped (non-finite loss or gradient norm)."""
    controller: dict[str, Any] | None = None
    """``state_dict()`` of a MoD compute-target controller (JSON values), if the run has one."""
    format_version: int = TRAIN_STATE_VERSION
    """Version of this file's layout."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form additions (kept on resume)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, path: str) -> TrainState:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object")
        if data.get("format_version", TRAIN_STATE_VERSION) > TRAIN_STATE_VERSION:
            raise ValueError(
                f"{path}: format_version {data['format_version']} is newer than this "
                f"megatron_mod ({TRAIN_STATE_VERSION}); upgrade megatron_mod"
            )
        names = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - names)
        missing = sorted(
            {"iteration", "consumed_samples", "scheduler", "args", "layout"} - set(data)
        )
        if unknown or missing:
            raise ValueError(f"{path}: unknown keys {unknown}, missing keys {missing}")
        return cls(**data)


def read_train_state(iter_dir: str | os.PathLike) -> TrainState:
    """The ``train_state.json`` of a training checkpoint iteration."""
    path = Path(iter_dir) / TRAIN_STATE_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {iter_dir} is not a training checkpoint")
    return TrainState.from_json(path.read_text(encoding="utf-8"), str(path))


def find_training_checkpoint(save_dir: str | os.PathLike) -> tuple[Path, TrainState] | None:
    """The iteration ``latest`` names in ``save_dir``, if it is a training checkpoint.

    Read-only, so every rank may call it before the process group exists. Returns None when
    ``save_dir`` has no ``latest`` or it names a model-only iteration (an imported model): such
    a directory starts a new run.
    """
    from megatron_mod.checkpointing import LATEST_FILENAME

    save_dir = Path(save_dir)
    latest = save_dir / LATEST_FILENAME
    if not latest.is_file():
        return None
    iter_dir = save_dir / latest.read_text(encoding="utf-8").strip()
    # Every rank reads, nothing is changed here: a kill between the two renames that replace an
    # iteration leaves it as .old_<name>, which clean_stale (rank 0) puts back before loading.
    found = iter_dir
    if not iter_dir.exists() and (save_dir / f".old_{iter_dir.name}").is_dir():
        found = save_dir / f".old_{iter_dir.name}"
    if not (found / TRAIN_STATE_FILENAME).is_file():
        return None
    if not (found / "metadata.json").is_file():
        raise FileNotFoundError(
            f"{latest} names {iter_dir.name}, which is incomplete (no metadata.json); point "
            f"{LATEST_FILENAME} at an earlier iter_* directory or start over with --overwrite"
        )
    return iter_dir, read_train_state(found)


def training_iterations(save_dir: str | os.PathLike) -> list[int]:
    """Iterations in ``save_dir`` that are complete training checkpoints, ascending."""
    out = []
    for path in Path(save_dir).iterdir() if Path(save_dir).is_dir() else []:
        match = _ITER_RE.match(path.name)
        if match and (path / TRAIN_STATE_FILENAME).is_file():
            out.append(int(match.group(1)))
    return sorted(out)


def _restore_interrupted_replace(save_dir: Path) -> None:
    """Undo a kill between the two renames that replace an existing iteration."""
    for old in save_dir.glob(".old_iter_*") if save_dir.is_dir() else []:
        final = save_dir / old.name.removeprefix(".old_")
        if not final.exists():
            os.replace(old, final)


def clean_stale(save_dir: str | os.PathLike) -> list[str]:
    """Remove what an interrupted save left in ``save_dir`` (rank 0, before training).

    Returns:
        Names of the removed entries.
    """
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    _restore_interrupted_replace(save_dir)
    removed = []
    for path in sorted(save_dir.iterdir()):
        if path.name.startswith((".tmp_iter_", ".old_iter_")):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def prune(save_dir: str | os.PathLike, keep_last: int) -> list[int]:
    """Delete all but the newest ``keep_last`` training iterations (never the latest).

    Model-only iterations (an imported model saved next to the run) are left alone.

    Returns:
        The deleted iteration numbers.
    """
    if keep_last < 1:
        return []
    iterations = training_iterations(save_dir)
    doomed = iterations[:-keep_last]
    for it in doomed:
        # Renamed first, so a kill mid-delete leaves a hidden directory, not a half iteration.
        path = Path(save_dir) / f"iter_{it:07d}"
        trash = path.with_name(f".old_{path.name}.deleting")
        os.replace(path, trash)
        shutil.rmtree(trash)
    return doomed


# ------------------------------------------------------------------------------ RNG


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _layout() -> dict[str, int]:
    from megatron.core import parallel_state as ps

    return {
        "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
        "data_parallel_size": ps.get_data_parallel_world_size(),
    }


def _rng_sharded_object(data):
    """This rank's RNG state as one cell of a (PP, TP, DP) grid: every rank saves its own."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    layout = _layout()
    shape = tuple(
        layout[k]
        for k in (
            "pipeline_model_parallel_size",
            "tensor_model_parallel_size",
            "data_parallel_size",
        )
    )
    offset = (
        ps.get_pipeline_model_parallel_rank(),
        ps.get_tensor_model_parallel_rank(),
        ps.get_data_parallel_rank(),
    )
    return ShardedObject("rng_state", data, shape, offset, replica_id=0)


# ------------------------------------------------------------------------------ save / load


def save_training_checkpoint(
    save_dir: str | os.PathLike,
    model,
    optimizer,
    scheduler,
    metadata,
    state: TrainState,
    keep_last: int = 0,
    optimizer_format: str = "dp_reshardable",
) -> Path:
    """Save iteration ``state.iteration`` of a run (collective: call on every rank).

    Args:
        save_dir: the run's ``--save`` directory.
        model: this rank's GPTModel (the module inside DDP).
        optimizer: the Megatron optimizer.
        scheduler: the ``OptimizerParamScheduler``.
        metadata: the model's :class:`~megatron_mod.checkpointing.CheckpointMetadata`.
        state: iteration, data position, arguments (its ``scheduler`` and ``layout`` are filled
            in here).
        keep_last: keep only the newest this many training iterations (0: keep all).
        optimizer_format: the distributed optimizer's format (:data:`OPTIMIZER_FORMATS`).

    Returns:
        The iteration directory.
    """
    if optimizer_format not in OPTIMIZER_FORMATS:
        raise ValueError(f"optimizer_format {optimizer_format!r}: use one of {OPTIMIZER_FORMATS}")
    from megatron_mod.checkpointing import model_sharded_state_dict, save_model_checkpoint

    state.scheduler = scheduler.state_dict()
    state.layout = {
        **_layout(),
        "use_distributed_optimizer": _is_distributed(optimizer),
        "optimizer_format": optimizer_format,
    }
    model_sd = model_sharded_state_dict(model)
    metadata_sd = {"distrib_optim_sharding_type": optimizer_format}
    extra = {
        "optimizer": optimizer.sharded_state_dict(model_sd, metadata=metadata_sd),
        "rng_state": _rng_sharded_object(_rng_state()),
    }
    iter_dir = save_model_checkpoint(
        model,
        save_dir,
        metadata,
        iteration=state.iteration,
        extra_sharded_state_dict=extra,
        extra_files={TRAIN_STATE_FILENAME: state.to_json()},
    )
    if keep_last and torch.distributed.get_rank() == 0:
        prune(save_dir, keep_last)
    torch.distributed.barrier()
    return iter_dir


def _is_distributed(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(
        isinstance(opt, DistributedOptimizer)
        for opt in getattr(optimizer, "chained_optimizers", [optimizer])
    )


def _init_empty_distributed_state(optimizer) -> None:
    """Give a fresh distributed optimizer state tensors for the checkpoint to load into.

    Without apex or Transformer Engine, megatron-core reads the Adam step from the state, which
    a never-stepped optimizer lacks. megatron-core's own dummy initialisation steps once with
    zero gradients at the scheduler's initial learning rate; all of it is then overwritten by
    the load (model weights, main weights, moments and step).
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def _saved_steps(optimizer_state) -> set:
    """The Adam step(s) a distributed optimizer recorded in its param groups (native Adam)."""
    states = optimizer_state if isinstance(optimizer_state, list) else [optimizer_state]
    if isinstance(optimizer_state, dict) and "optimizer" not in optimizer_state:
        states = list(optimizer_state.values())  # a chain of several optimizers
    steps = set()
    for state in states:
        if isinstance(state, dict) and isinstance(state.get("optimizer"), dict):
            for group in state["optimizer"].get("param_groups", []):
                if group.get("step") is not None:
                    steps.add(float(group["step"]))
    return steps


def _restore_adam_steps(optimizer, steps: set) -> None:
    """Give every parameter state its own ``step`` tensor holding the saved step.

    megatron-core's distributed optimizer, without apex or Transformer Engine (torch's own
    Adam), keeps the step in its param groups and restores it into per-parameter states only
    when those are empty, and then as one tensor shared by all of them, which Adam's in-place
    increments would advance once per parameter. Both would make every later bias correction
    differ from the uninterrupted run's.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if len(steps) != 1:
        return
    (step,) = steps
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, DistributedOptimizer):
            continue
        for param_state in opt.optimizer.state.values():
            current = param_state.get("step")
            if isinstance(current, torch.Tensor):
                param_state["step"] = torch.full_like(current, step)


def load_training_checkpoint(
    iter_dir: str | os.PathLike, model, optimizer, scheduler
) -> TrainState:
    """Load model, optimizer, scheduler and (same layout only) RNG state of a training iteration.

    Collective: call on every rank, after the optimizer is built. Under another TP/PP/DP
    layout the tensors are re-sharded by dist_checkpointing; the per-rank RNG states have no
    counterpart then and are left as seeded (as Megatron-LM does).

    Returns:
        The iteration's :class:`TrainState`.
    """
    from megatron.core import dist_checkpointing

    from megatron_mod.checkpointing import model_sharded_state_dict

    iter_dir = Path(iter_dir)
    state = read_train_state(iter_dir)
    check_optimizer_compatible(state, _layout(), _is_distributed(optimizer), iter_dir)
    _init_empty_distributed_state(optimizer)
    model_sd = model_sharded_state_dict(model)
    metadata_sd = {"distrib_optim_sharding_type": state.layout["optimizer_format"]}
    request = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=metadata_sd),
    }
    same_layout = all(state.layout[k] == v for k, v in _layout().items())
    if same_layout:
        request["rng_state"] = _rng_sharded_object(None)
    loaded = dist_checkpointing.load(request, str(iter_dir))
    model.load_state_dict(loaded["model"])
    steps = _saved_steps(loaded["optimizer"])
    with torch.no_grad():  # the distributed optimizer copies into views of the parameters
        optimizer.load_state_dict(loaded["optimizer"])
    _restore_adam_steps(optimizer, steps)
    scheduler.load_state_dict(state.scheduler)
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    return state


def check_optimizer_compatible(
    state: TrainState, layout: dict, distributed: bool, iter_dir: str | os.PathLike
) -> None:
    """Refuse an optimizer state this run cannot load, before anything is read.

    Args:
        state: the checkpoint's train state.
        layout: this run's TP/PP/DP sizes.
        distributed: whether this run uses the distributed optimizer.
        iter_dir: the checkpoint (for the message).

    Raises:
        ValueError: the optimizer kind differs, or a ``dp_reshardable`` distributed-optimizer
            state meets another tensor or pipeline parallel size.
    """
    saved = state.layout
    saved_dist = bool(saved.get("use_distributed_optimizer"))
    if saved_dist != distributed:
        kind = "distributed" if saved_dist else "non-distributed"
        flag = "with" if saved_dist else "without"
        raise ValueError(
            f"{iter_dir} holds a {kind} optimizer state; resume {flag} --use-distributed-optimizer"
        )
    tp, pp = "tensor_model_parallel_size", "pipeline_model_parallel_size"
    if (
        distributed
        and saved.get("optimizer_format") == "dp_reshardable"
        and (saved[tp], saved[pp]) != (layout[tp], layout[pp])
    ):
        raise ValueError(
            f"{iter_dir}: the distributed optimizer state was saved as dp_reshardable under TP "
            f"{saved[tp]} / PP {saved[pp]} and loads only under the same TP/PP (this run: TP "
            f"{layout[tp]} / PP {layout[pp]}). Resume with the saved TP/PP, or save with "
            "--dist-ckpt-optim-fully-reshardable to "
            "change them."
        )
