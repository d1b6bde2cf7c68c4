"""Streaming access to ``torch_dist`` checkpoints, one part at a time: what the converters use.

:class:`StreamingCheckpointWriter` writes a checkpoint from one process a part (a layer) at a
time, as if each part were saved by its own rank, so peak memory is one part rather than the
whole model; :func:`read_checkpoint_tensors` reads a few full tensors back from a checkpoint any
TP/PP layout wrote; :func:`checkpoint_tensor_dtypes` / :func:`checkpoint_tensor_shapes` read only
the metadata. The checkpoint format itself is described in :mod:`megatron_mod.checkpointing`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = [
    "StreamingCheckpointWriter",
    "checkpoint_tensor_dtypes",
    "checkpoint_tensor_shapes",
    "read_checkpoint_tensors",
]


def checkpoint_tensor_dtypes(iter_dir: str | os.PathLike) -> dict[str, torch.dtype]:
    """Checkpoint key -> stored dtype, from the dist checkpoint's ``.metadata``."""
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(iter_dir)).read_metadata()
    return {
        key: value.properties.dtype
        for key, value in md.state_dict_metadata.items()
        if hasattr(value, "properties") and hasattr(value, "chunks")
    }


def checkpoint_tensor_shapes(iter_dir: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> stored global shape (layer-stacked keys include the layer axis)."""
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(iter_dir)).read_metadata()
    return {
        key: tuple(value.size)
        for key, value in md.state_dict_metadata.items()
        if hasattr(value, "size") and hasattr(value, "chunks")
    }


def read_checkpoint_tensors(
    iter_dir: str | os.PathLike, items: dict, dtypes: dict[str, torch.dtype] | None = None
) -> dict[str, torch.Tensor]:
    """Read a few full (TP=1) model tensors from a dist checkpoint, whatever layout wrote it.

    ``items`` are entries of a TP=1/PP=1 model's :func:`model_sharded_state_dict` (typically
    of a meta-device model, their data is ignored). Each is re-expressed as a single chunk of
    the stored global tensor -- one layer of a layer-stacked key, a SwiGLU fc1 as one
    ``[gate; up]`` block rather than megatron's two factory halves -- and read through
    ``dist_checkpointing.load``, which reshards from whatever chunks a TP/PP run stored. Only
    these tensors are read, so memory stays at their size.

    Args:
        iter_dir: the dist checkpoint (an ``iter_*`` directory).
        items: name -> ShardedTensor / ShardedTensorFactory (ShardedObjects are skipped).
        dtypes: stored dtype per key (default: read from the checkpoint).

    Returns:
        name -> tensor with the item's local (full) shape, in the stored dtype.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    dtypes = dtypes or checkpoint_tensor_dtypes(iter_dir)
    request, shapes = {}, {}
    for name, item in items.items():
        if isinstance(item, ShardedObject):
            continue
        if item.key not in dtypes:
            raise KeyError(f"{iter_dir}: checkpoint has no tensor {item.key} (for {name})")
        shape = tuple(item.data.shape)
        shapes[name] = shape
        buf = torch.empty(shape, dtype=dtypes[item.key])
        if isinstance(item, ShardedTensor) and item.prepend_axis_num == 1:
            layer, layers = item.global_offset[0], item.global_shape[0]
        elif isinstance(item, ShardedTensor) and item.prepend_axis_num == 0:
            layer = layers = None
        else:  # a factory (SwiGLU fc1): its built halves carry the layer stacking
            first = next(v for v in nested_values(item.build()) if isinstance(v, ShardedTensor))
            if first.prepend_axis_num == 1:
                layer, layers = first.global_offset[0], first.global_shape[0]
            else:
                layer = layers = None
        if layer is None:
            request[name] = ShardedTensor.from_rank_offsets(item.key, buf)
        else:
            # An unstacked chunk [1, ...] at the layer's offset: megatron-core reads it through
            # DCP's generic resharding (no legacy whole-grid ShardedTensor for one process).
            request[name] = ShardedTensor.from_rank_offsets(
                item.key, buf.unsqueeze(0), (0, layer, layers)
            )
    loaded = dist_checkpointing.load(
        {"model": request}, str(iter_dir), validate_access_integrity=False
    )["model"]
    return {name: loaded[name].reshape(shapes[name]) for name in request}


# ------------------------------------------------------------------------------ streaming writer


class StreamingCheckpointWriter:
    """Write one ``torch_dist`` checkpoint from a single process, a part at a time.

    ``dist_checkpointing.save`` needs every tensor of the calling rank in memory at once. This
    writer instead writes each part (e.g. one transformer layer) as if it were saved by its own
    rank -- into its own ``__{part}_0.distcp`` file -- and merges the parts' metadata into the
    one ``.metadata`` a multi-rank save would have produced. megatron-core's loader cannot tell
    the difference, and peak memory is one part.

    The parts must together cover every tensor exactly once (the usual dist-checkpoint rule);
    the loader checks shapes, and :meth:`finalize` checks coverage.
    """

    def __init__(self, iter_dir: str | os.PathLike):
        from torch.distributed.checkpoint import FileSystemWriter

        self.iter_dir = Path(iter_dir)
        self.iter_dir.mkdir(parents=True, exist_ok=True)
        # No copy-ahead: the tensors are on the CPU already, and torch's overlapping loader
        # would create a CUDA stream (and a CUDA context on GPU 0) on a GPU host.
        self._writer = FileSystemWriter(
            str(self.iter_dir), single_file_per_rank=True, per_thread_copy_ahead=0
        )
        self._state_dict_metadata: dict = {}
        self._results: list = []
        self._parts = 0

    def write_part(self, sharded_state_dict: dict) -> None:
        """Write one part: a (flat) sharded state dict whose ShardedTensors hold real data.

        Each ShardedTensor becomes one DCP chunk at its global offset, with its layer axes
        (``prepend_axis_num``) kept as leading size-1 dims -- the chunk layout megatron-core's
        own save produces and its loader reads. ShardedObjects are stored as megatron does
        (``torch.save`` of a one-element list under their unique key).
        """
        import io

        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import (
            ShardedObject,
            ShardedTensor,
            apply_factories,
        )
        from torch.distributed.checkpoint.metadata import (
            BytesStorageMetadata,
            ChunkStorageMetadata,
            MetadataIndex,
            TensorProperties,
            TensorStorageMetadata,
        )
        from torch.distributed.checkpoint.planner import (
            SavePlan,
            TensorWriteData,
            WriteItem,
            WriteItemType,
        )

        sharded_state_dict = dict(sharded_state_dict)
        apply_factories(sharded_state_dict)
        items, data = [], {}
        for item in nested_values(sharded_state_dict):
            if isinstance(item, ShardedObject):
                buffer = io.BytesIO()
                torch.save([item.data], buffer)
                index = MetadataIndex(item.unique_key)
                items.append(WriteItem(index=index, type=WriteItemType.BYTE_IO))
                data[index] = buffer
                self._add_metadata(item.unique_key, BytesStorageMetadata(), None)
                continue
            if not isinstance(item, ShardedTensor):
                raise TypeError(f"{item!r}: cannot write {type(item).__name__} into a checkpoint")
            if item.flattened_range is not None:
                raise ValueError(
                    f"{item.key}: flattened (distributed-optimizer) shards unsupported"
                )
            if any(item.replica_id) if isinstance(item.replica_id, tuple) else item.replica_id:
                continue  # not the main replica: another part/rank writes it
            sizes = torch.Size((1,) * item.prepend_axis_num + tuple(item.local_shape))
            tensor = item.data.detach().reshape(sizes)
            chunk = ChunkStorageMetadata(offsets=torch.Size(item.global_offset), sizes=sizes)
            props = TensorProperties(dtype=tensor.dtype)
            index = MetadataIndex(item.key, chunk.offsets)
            items.append(
                WriteItem(
                    index=index,
                    type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=chunk, properties=props, size=torch.Size(item.global_shape)
                    ),
                )
            )
            data[index] = tensor
            self._add_metadata(
                item.key,
                TensorStorageMetadata(
                    properties=props, size=torch.Size(item.global_shape), chunks=[]
                ),
                chunk,
            )
        self._writer.set_up_storage_writer(True)
        plan = self._writer.prepare_local_plan(SavePlan(items))
        # prepare_global_plan names the i-th plan's file "__{i}_0.distcp": pad with empty plans
        # so this part gets a file of its own, exactly as rank i of a multi-rank save would.
        plan = self._writer.prepare_global_plan([SavePlan([])] * self._parts + [plan])[-1]
        self._results.append(self._writer.write_data(plan, _Resolver(data)).wait())
        self._parts += 1

    def _add_metadata(self, key: str, md, chunk) -> None:
        known = self._state_dict_metadata.setdefault(key, md)
        if chunk is None:
            return
        if known.size != md.size or known.properties.dtype != md.properties.dtype:
            raise ValueError(f"checkpoint key {key}: parts disagree on global shape or dtype")
        known.chunks.append(chunk)

    def finalize(self) -> None:
        """Write the merged ``.metadata``, ``common.pt`` and ``metadata.json``."""
        from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
        from torch.distributed.checkpoint.metadata import Metadata

        for key, md in self._state_dict_metadata.items():
            chunks = getattr(md, "chunks", None)
            if chunks is None:
                continue
            covered = sum(int(c.sizes.numel()) for c in chunks)
            if covered != int(torch.Size(md.size).numel()):
                raise RuntimeError(
                    f"checkpoint key {key}: parts cover {covered} of {md.size.numel()} elements"
                )
        self._writer.finish(Metadata(state_dict_metadata=self._state_dict_metadata), self._results)
        torch.save({}, self.iter_dir / "common.pt")
        save_config(CheckpointingConfig("torch_dist", 1), str(self.iter_dir))


class _Resolver:
    """The one planner method ``FileSystemWriter.write_data`` calls: index -> data to write."""

    def __init__(self, data: dict):
        self._data = data

    def resolve_data(self, write_item):
        data = self._data.pop(write_item.index)
        if isinstance(data, torch.Tensor):
            # A view would make torch.save write its whole base storage.
            if data.untyped_storage().nbytes() != data.numel() * data.element_size():
                data = data.clone()
        return data
