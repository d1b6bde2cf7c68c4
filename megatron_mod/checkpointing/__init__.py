"""megatron-mod checkpoints: a megatron-core ``torch_dist`` checkpoint plus its model config.

Layout of a checkpoint directory::

    CKPT/
      megatron_mod_config.json   model config: preset + TransformerConfig overrides, MoDConfig,
                                 true and padded vocab, max sequence length, tokenizer dir,
                                 default TP/PP, stored dtype, source HF config (for export)
      latest                     text file: the name of the newest complete iteration directory
      iter_0000000/              megatron-core dist_checkpointing (torch_dist) checkpoint
        .metadata  __*_*.distcp  common.pt  metadata.json

Every ``iter_*`` directory is one dist checkpoint. Model tensors use the keys of the model's
``sharded_state_dict()`` (layer-stacked, TE names, see ``megatron_mod.hf.mapping.checkpoint_key``),
so any TP/PP layout can load what any other wrote. The trainer adds its own state (optimizer,
scheduler, RNG, data position) to the same dist checkpoint under keys that do not start with a
model key, writes ``iter_{N:07d}`` through :func:`save_model_checkpoint`'s temp-dir + rename
protocol (or its ``extra_sharded_state_dict`` / ``common_state`` arguments) and then moves
``latest``; model-only loaders simply ignore the extra keys.

Router parameters exist on routed layers only, so they cannot share megatron-core's layer-stacked
key (``decoder.layers.router.weight`` with a ``num_layers`` axis would have holes, which
dist_checkpointing rejects). :func:`model_sharded_state_dict` gives them per-layer keys
``decoder.layers.{global_index}.router.{weight,bias}``; always save and load through it.

Writes are atomic: an iteration is written into a hidden temp directory and renamed into place,
and ``latest`` is replaced with ``os.replace``; a crash leaves the previous state readable. The
converters' part-at-a-time readers and writer live in :mod:`megatron_mod.checkpointing.streaming`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_mod.atomic import write_text_atomic
from megatron_mod.config import MoDConfig

__all__ = [
    "CONFIG_FILENAME",
    "LATEST_FILENAME",
    "FORMAT_VERSION",
    "CheckpointMetadata",
    "iteration_dir_name",
    "read_checkpoint_metadata",
    "write_checkpoint_metadata",
    "resolve_iteration_dir",
    "write_latest",
    "model_sharded_state_dict",
    "build_model_from_metadata",
    "save_model_checkpoint",
    "load_model_checkpoint",
    "dtype_from_name",
    "dtype_name",
]

CONFIG_FILENAME = "megatron_mod_config.json"
LATEST_FILENAME = "latest"
FORMAT_VERSION = 1

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def dtype_from_name(name: str) -> torch.dtype:
    """``fp32``/``float32``, ``bf16``/``bfloat16``, ``fp16``/``float16`` -> torch dtype."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """torch dtype -> its canonical name (``float32``, ``bfloat16``, ``float16``)."""
    return str(dtype).removeprefix("torch.")


def iteration_dir_name(iteration: int) -> str:
    """``iter_{iteration:07d}``, the Megatron-LM naming of iteration directories."""
    return f"iter_{iteration:07d}"


# ------------------------------------------------------------------------------ metadata


@dataclass
class CheckpointMetadata:
    """Everything needed to rebuild the model of a checkpoint (``megatron_mod_config.json``).

    Attributes:
        preset: ``megatron_mod.models.PRESETS`` name the config starts from, or ``custom``
            (then ``model_overrides`` holds every shape field).
        model_overrides: TransformerConfig fields on top of the preset (JSON values only).
        mod: ``MoDConfig.to_dict()``, or None for a dense model.
        vocab_size: the tokenizer's vocabulary size (HF export trims to it).
        padded_vocab_size: rows of the embedding / output layer in the checkpoint.
        make_vocab_size_divisible_by: padding rule used (x TP).
        max_seq_len: longest sequence the model is built for.
        tensor_model_parallel_size: default TP for training (any TP/PP can load the checkpoint).
        pipeline_model_parallel_size: default PP for training.
        params_dtype: dtype of the stored tensors (``float32``, ``bfloat16``, ``float16``).
        tokenizer_dir: directory with tokenizer files (copied along on HF export), if known.
        hf_config: the source HF ``config.json`` (export restores ids, rope theta, ...).
        source: free-form provenance (converter, source dir).
        format_version: version of this layout.
    """

    preset: str
    model_overrides: dict[str, Any]
    mod: dict[str, Any] | None
    vocab_size: int
    padded_vocab_size: int
    max_seq_len: int
    make_vocab_size_divisible_by: int = 128
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    params_dtype: str = "float32"
    tokenizer_dir: str | None = None
    hf_config: dict[str, Any] | None = None
    source: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str = CONFIG_FILENAME) -> CheckpointMetadata:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; known keys: {sorted(names)}")
        missing = sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in data
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        )
        if missing:
            raise ValueError(f"{path}: missing keys {missing}")
        if data.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise ValueError(
                f"{path}: format_version {data['format_version']} is newer than this "
                f"megatron_mod ({FORMAT_VERSION}); upgrade megatron_mod"
            )
        return cls(**data)

    @property
    def mod_config(self) -> MoDConfig | None:
        """The checkpoint's MoDConfig (None for a dense model)."""
        return None if self.mod is None else MoDConfig.from_dict(self.mod)

    @property
    def num_layers(self) -> int:
        return self.transformer_config().num_layers

    def routed_layers(self) -> list[int]:
        """Global indices of routed layers ([] for a dense model)."""
        mod = self.mod_config
        return mod.routed_layer_indices(self.num_layers) if mod else []

    def transformer_config(self, **extra):
        """``llama_config(preset, **model_overrides, **extra)``; TP/PP from the parallel state."""
        from megatron_mod.models import PRESETS, llama_config

        # A "custom" shape carries every shape field in model_overrides; any preset is a base.
        base = self.preset if self.preset in PRESETS else "tiny"
        config = llama_config(base, **{**self.model_overrides, **extra})
        config.preset = self.preset
        return config

    def dims(self):
        """The :class:`~megatron_mod.hf.mapping.LlamaDims` of the model."""
        from megatron_mod.hf.mapping import LlamaDims

        cfg = self.transformer_config(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
        return LlamaDims(
            num_layers=cfg.num_layers,
            hidden_size=cfg.hidden_size,
            num_attention_heads=cfg.num_attention_heads,
            num_query_groups=cfg.num_query_groups or cfg.num_attention_heads,
            head_dim=cfg.kv_channels,
            ffn_hidden_size=cfg.ffn_hidden_size,
            vocab_size=self.vocab_size,
            padded_vocab_size=self.padded_vocab_size,
            qkv_bias=bool(cfg.add_qkv_bias),
            tied=bool(getattr(cfg, "share_embeddings_and_output_weights", False)),
        )


def write_checkpoint_metadata(ckpt_dir: str | os.PathLike, metadata: CheckpointMetadata) -> None:
    """Write ``megatron_mod_config.json`` atomically."""
    text = json.dumps(metadata.to_dict(), indent=2, sort_keys=True) + "\n"
    write_text_atomic(Path(ckpt_dir) / CONFIG_FILENAME, text)


def read_checkpoint_metadata(ckpt_dir: str | os.PathLike) -> CheckpointMetadata:
    """Read a checkpoint's ``megatron_mod_config.json``.

    Raises:
        FileNotFoundError: naming the missing file, when ``ckpt_dir`` is not a checkpoint.
        ValueError: for a malformed file (naming the file and the problem).
    """
    path = Path(ckpt_dir) / CONFIG_FILENAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {ckpt_dir} is not a megatron_mod checkpoint (create one with "
            "tools/convert_hf_to_megatron.py)"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from err
    return CheckpointMetadata.from_dict(data, str(path))


def write_latest(ckpt_dir: str | os.PathLike, iteration: int) -> None:
    """Point ``latest`` at ``iter_{iteration:07d}`` (atomically)."""
    write_text_atomic(Path(ckpt_dir) / LATEST_FILENAME, iteration_dir_name(iteration) + "\n")


def resolve_iteration_dir(ckpt_dir: str | os.PathLike, iteration: int | None = None) -> Path:
    """The dist-checkpoint directory of ``iteration`` (default: the one ``latest`` names)."""
    ckpt_dir = Path(ckpt_dir)
    if iteration is None:
        latest = ckpt_dir / LATEST_FILENAME
        if not latest.is_file():
            raise FileNotFoundError(
                f"{latest} not found: no complete iteration in {ckpt_dir} (an interrupted write "
                "leaves only hidden .tmp directories)"
            )
        name = latest.read_text().strip()
    else:
        name = iteration_dir_name(iteration)
    path = ckpt_dir / name
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(f"{path} is not a complete dist checkpoint (no metadata.json)")
    return path


# ------------------------------------------------------------------------------ models


def model_sharded_state_dict(model, prefix: str = "") -> dict:
    """``model.sharded_state_dict()`` with per-layer keys for router parameters.

    megatron-core stacks each layer parameter under one key with a leading ``num_layers`` axis;
    routers exist on routed layers only, which would leave holes in that axis. They are re-keyed
    as ``decoder.layers.{global_index}.router.*`` without the layer axis.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    out = {}
    for name, item in model.sharded_state_dict(prefix=prefix).items():
        if (
            isinstance(item, ShardedTensor)
            and ".router." in item.key
            and item.prepend_axis_num == 1
            and ".layers.router." in item.key
        ):
            index = item.global_offset[0]
            item = dataclasses.replace(
                item,
                key=item.key.replace(".layers.router.", f".layers.{index}.router."),
                global_shape=item.global_shape[1:],
                global_offset=item.global_offset[1:],
                axis_fragmentations=item.axis_fragmentations[1:],
                prepend_axis_num=0,
            )
        out[name] = item
    return out


def build_model_from_metadata(
    metadata: CheckpointMetadata,
    mod_config: MoDConfig | None = None,
    dense: bool = False,
    meta_device: bool = False,
    use_transformer_engine: bool | None = None,
    **config_overrides,
):
    """Build this pipeline stage's GPTModel for a checkpoint (weights not loaded).

    Args:
        metadata: the checkpoint's metadata.
        mod_config: replaces the checkpoint's MoDConfig (e.g. another threshold at inference).
        dense: build the dense model (routers are not loaded).
        meta_device: build parameters on the meta device (no memory; for key/shape planning).
            Implies ``use_cpu_initialization=True``, so nothing is allocated on a GPU; the
            (tiny) MoD routers are then real CPU tensors with their initial values.
        use_transformer_engine: forwarded to ``build_gpt_model``.
        **config_overrides: extra TransformerConfig fields (e.g. ``sequence_parallel=True``).
    """
    from megatron_mod.models import build_gpt_model

    if meta_device:
        # megatron-core allocates on torch.cuda.current_device() explicitly unless
        # use_cpu_initialization is set, and an explicit device escapes the meta-device context:
        # a planning model on a GPU host would otherwise materialise the whole model on GPU 0.
        config_overrides = {**config_overrides, "use_cpu_initialization": True}
    config = metadata.transformer_config(**config_overrides)
    mod = None if dense else (mod_config or metadata.mod_config)
    with torch.device("meta") if meta_device else contextlib.nullcontext():
        return build_gpt_model(
            config,
            mod,
            metadata.padded_vocab_size,
            metadata.max_seq_len,
            use_transformer_engine=use_transformer_engine,
        )


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def save_model_checkpoint(
    model,
    ckpt_dir: str | os.PathLike,
    metadata: CheckpointMetadata,
    iteration: int = 0,
    extra_sharded_state_dict: dict | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Save a model as iteration ``iteration`` of a checkpoint (collective: call on all ranks).

    The iteration is written into a hidden temp directory and renamed; then the config JSON is
    (re)written and ``latest`` moved. A previous iteration of the same number is replaced.

    Args:
        model: this rank's GPTModel (any TP/PP).
        ckpt_dir: checkpoint root (created if missing).
        metadata: the model config to record.
        iteration: iteration number (0 for a converted model).
        extra_sharded_state_dict: more sharded state (e.g. the trainer's optimizer state) saved
            into the same dist checkpoint.
        extra_files: file name -> text written (rank 0) into the iteration directory before it
            is renamed into place, so they appear together with the tensors or not at all.

    Returns:
        The iteration directory.
    """
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / iteration_dir_name(iteration)
    tmp = ckpt_dir / f".tmp_{final.name}"
    if _rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    state = {"model": model_sharded_state_dict(model)}
    if extra_sharded_state_dict:
        state.update(extra_sharded_state_dict)
    dist_checkpointing.save(state, str(tmp))
    _barrier()
    if _rank() == 0:
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        # Everything is on disk before the rename makes it visible (the tensor files are
        # fsynced by the writer; the small files and the directory entries here).
        for path in [*tmp.iterdir(), tmp]:
            _fsync(path)
        write_checkpoint_metadata(ckpt_dir, metadata)
        if final.exists():
            old = ckpt_dir / f".old_{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync(ckpt_dir)
        write_latest(ckpt_dir, iteration)
        _fsync(ckpt_dir)
    _barrier()
    return final


def _fsync(path: Path) -> None:
    """Flush a file's data or a directory's entries to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_model_checkpoint(
    ckpt_dir: str | os.PathLike,
    tp: int | None = None,
    pp: int | None = None,
    iteration: int | None = None,
    mod_config: MoDConfig | None = None,
    dense: bool = False,
    use_transformer_engine: bool | None = None,
    **config_overrides,
):
    """Build this rank's model for a checkpoint and load its weights (any TP/PP).

    Initialises megatron (``platform.initialize(tp, pp)``) when it is not yet initialised;
    otherwise uses the current parallel state (``tp``/``pp``, if given, must match it).

    Args:
        ckpt_dir: checkpoint root.
        tp: tensor-model-parallel size (default: current, or the checkpoint's default).
        pp: pipeline-model-parallel size (default: current, or the checkpoint's default).
        iteration: which iteration (default: ``latest``).
        mod_config: replace the checkpoint's MoDConfig (e.g. another threshold).
        dense: load as a dense model, ignoring routers.
        use_transformer_engine: force the TE or local layer spec (default: TE when importable).
        **config_overrides: extra TransformerConfig fields.

    Returns:
        (model, metadata).
    """
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_mod import platform

    metadata = read_checkpoint_metadata(ckpt_dir)
    iter_dir = resolve_iteration_dir(ckpt_dir, iteration)
    if not parallel_state.model_parallel_is_initialized():
        platform.initialize(
            tp=tp or metadata.tensor_model_parallel_size,
            pp=pp or metadata.pipeline_model_parallel_size,
        )
    cur_tp = parallel_state.get_tensor_model_parallel_world_size()
    cur_pp = parallel_state.get_pipeline_model_parallel_world_size()
    if (tp and tp != cur_tp) or (pp and pp != cur_pp):
        raise ValueError(
            f"load_model_checkpoint(tp={tp}, pp={pp}) but megatron is initialised with "
            f"tp={cur_tp}, pp={cur_pp}; pass matching values or call platform.destroy() first"
        )
    if metadata.padded_vocab_size % cur_tp:
        raise ValueError(
            f"{ckpt_dir}: padded vocabulary {metadata.padded_vocab_size} is not divisible by "
            f"tp={cur_tp}; re-import the model with --tp {cur_tp} (padding is chosen at import)"
        )
    model = build_model_from_metadata(
        metadata, mod_config, dense, use_transformer_engine=use_transformer_engine,
        **config_overrides,
    )  # fmt: skip
    state = dist_checkpointing.load({"model": model_sharded_state_dict(model)}, str(iter_dir))
    model.load_state_dict(state["model"])
    return model, metadata
