"""Streaming HF LLaMA <-> megatron-mod checkpoint conversion (logic behind the two ``tools/`` CLIs).

Both directions use :mod:`megatron_mod.hf.mapping` for every name and layout fact,
:mod:`megatron_mod.hf.config` for the config translation and :mod:`megatron_mod.hf.io` for the
files; they validate all inputs before writing anything, stream tensors one transformer layer at a
time, and write into a hidden temp directory that is renamed into place at the end (a failed run
leaves no output).

Memory: import holds one layer's megatron tensors plus the HF tensors of the parameter being
converted; export holds one layer's checkpoint tensors plus one converted parameter. Shards of the
output are written incrementally (the safetensors header is planned up front), so the output shard
size does not change peak memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_mod.checkpointing import (
    CONFIG_FILENAME,
    CheckpointMetadata,
    build_model_from_metadata,
    dtype_from_name,
    dtype_name,
    iteration_dir_name,
    model_sharded_state_dict,
    read_checkpoint_metadata,
    resolve_iteration_dir,
    write_checkpoint_metadata,
    write_latest,
)
from megatron_mod.checkpointing.streaming import (
    StreamingCheckpointWriter,
    checkpoint_tensor_dtypes,
    checkpoint_tensor_shapes,
    read_checkpoint_tensors,
)
from megatron_mod.config import MoDConfig
from megatron_mod.hf.config import (
    hf_config_dict,
    hf_config_to_metadata,
    source_mod_config,
)
from megatron_mod.hf.io import (
    ConversionError,
    HFCheckpointReader,
    StreamingSafetensorsWriter,
    check_output_dir,
    copy_tokenizer,
    parse_size,
    peak_rss_bytes,
    progress_bar,
    read_json,
    staging_dir,
)
from megatron_mod.hf.mapping import (
    LlamaDims,
    ParamMapping,
    checkpoint_key,
    hf_param_shapes,
    layer_index,
    param_mappings,
)

__all__ = [
    "ConversionSummary",
    "HF_MODELING_FILES",
    "convert_hf_to_megatron",
    "convert_megatron_to_hf",
]

HF_MODELING_FILES = ("configuration_llama_mod.py", "modeling_llama_mod.py")
# Tensors some HF LLaMA checkpoints carry that are recomputed, not learned.
_IGNORED_HF_TENSORS = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def _init_conversion_process(what: str) -> None:
    """A one-process gloo group and TP=PP=1 model-parallel state, never touching CUDA.

    Conversion runs on the host (meta-device planning model, CPU tensors), so unlike
    ``platform.initialize`` this selects no GPU, creates no CUDA context or CUDA RNG state and
    applies no CPU patches: on a GPU host the converters leave every GPU alone. An already
    initialised TP=1/PP=1 state (e.g. a test session) is used as it is.
    """
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        if parallel_state.get_tensor_model_parallel_world_size() != 1 or (
            parallel_state.get_pipeline_model_parallel_world_size() != 1
        ):
            raise ConversionError(f"{what} runs in a single TP=1/PP=1 process")
        return
    if not torch.distributed.is_initialized():
        import socket

        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        torch.distributed.init_process_group(
            backend="gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
        )
    elif torch.distributed.get_world_size() != 1:
        raise ConversionError(f"{what} runs in a single process, not under torchrun")
    parallel_state.initialize_model_parallel(1, 1)


def _planning_model(
    metadata: CheckpointMetadata, routed: list[int], what: str
) -> tuple[dict[str, Any], dict[str, ParamMapping]]:
    """The TP=1 model's sharded state dict (meta device: no memory) and each parameter's mapping.

    Import and export both walk this: the sharded state dict gives the checkpoint keys and
    layouts megatron-core expects, the mappings the HF side of every parameter. ``routed``
    empty builds the dense model.
    """
    _init_conversion_process(what)
    model = build_model_from_metadata(
        metadata,
        dense=not routed,
        meta_device=True,
        use_transformer_engine=False,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
    )
    sharded = model_sharded_state_dict(model)
    mappings = {m.megatron_name: m for m in param_mappings(metadata.dims(), routed)}
    return sharded, mappings


def _validate_hf_tensors(
    reader: HFCheckpointReader,
    dims: LlamaDims,
    routed: list[int],
) -> tuple[set[int], torch.dtype, list[str]]:
    """Check every expected tensor exists with the right shape.

    Returns:
        (layers whose routers the source carries, the dtype to store, notes for the summary).
    """
    stored = reader.shapes()
    expected = hf_param_shapes(dims)
    notes = []
    if dims.tied and "lm_head.weight" in stored:
        # transformers ties lm_head to embed_tokens when the config says so, whatever is stored.
        notes.append("lm_head.weight in the source ignored: the config ties it to embed_tokens")
        del stored["lm_head.weight"]
    where = "model.safetensors.index.json" if len(set(reader.weight_map.values())) > 1 else ""
    for name, shape in expected.items():
        if name not in stored:
            hint = (
                " (the config has tie_word_embeddings=false; is the model tied?)"
                if name == "lm_head.weight"
                else ""
            )
            raise ConversionError(
                f"{reader.hf_dir}: tensor {name} is missing{f' from {where}' if where else ''}; "
                f"the checkpoint is incomplete or not a LLaMA-family model{hint}"
            )
        got, _, file = stored[name]
        if tuple(got) != tuple(shape):
            raise ConversionError(
                f"{reader.hf_dir / file}: tensor {name} has shape {list(got)}, expected "
                f"{list(shape)} from config.json; the weights do not match the config"
            )
    source_routers = set()
    for name in stored:
        if name in expected or _IGNORED_HF_TENSORS.match(name):
            continue
        idx = layer_index(name)
        if idx is not None and name in (
            f"model.layers.{idx}.router.weight",
            f"model.layers.{idx}.router.bias",
        ):
            want = (1, dims.hidden_size) if name.endswith("weight") else (1,)
            if tuple(stored[name][0]) != want:
                raise ConversionError(
                    f"{reader.hf_dir / stored[name][2]}: {name} has shape "
                    f"{list(stored[name][0])}, expected {list(want)}"
                )
            source_routers.add(idx)
            continue
        raise ConversionError(
            f"{reader.hf_dir / stored[name][2]}: unexpected tensor {name} for this model "
            "(config.json describes no such parameter); the converter handles the LLaMA-family "
            "layouts listed in docs/checkpoints.md only"
        )
    found: dict[Any, str] = {}
    for name in expected:
        found.setdefault(stored[name][1], name)
    if torch.float64 in found or None in found:
        bad = found.get(torch.float64) or found.get(None)
        raise ConversionError(
            f"{reader.hf_dir / stored[bad][2]}: tensor {bad} is stored as "
            f"{'F64' if torch.float64 in found else 'an unsupported dtype'}; convert the "
            "checkpoint to fp32/bf16/fp16 first (megatron-core trains in those)"
        )
    if len(found) == 1:
        return source_routers, next(iter(found)), notes
    # Mixed source dtypes: fp32 represents bf16 and fp16 values exactly, so nothing is rounded.
    names = ", ".join(f"{dtype_name(d)} (e.g. {n})" for d, n in found.items())
    notes.append(f"source mixes dtypes {names}: stored as float32, which holds each exactly")
    return source_routers, torch.float32, notes


def _part_of(name: str) -> str:
    idx = layer_index(name)
    if idx is not None:
        return f"layer {idx}"
    return "embedding" if name.startswith("embedding.") else "head"


def _ordered_parts(names: Iterable[str], num_layers: int) -> list[str]:
    present = {_part_of(n) for n in names}
    order = ["embedding"] + [f"layer {i}" for i in range(num_layers)] + ["head"]
    return [p for p in order if p in present]


@dataclass
class ConversionSummary:
    """What a conversion did (printed by the CLIs)."""

    direction: str
    source: str
    output: str
    tensors: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        lines = [
            f"{self.direction}: {self.source} -> {self.output}",
            f"  tensors written : {self.tensors}",
            f"  bytes written   : {self.bytes_written / 1e9:.3f} GB",
            f"  wall time       : {self.seconds:.1f} s",
            f"  peak RSS        : {self.peak_rss_bytes / 1e9:.3f} GB",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ------------------------------------------------------------------------------ import


def convert_hf_to_megatron(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    tp: int = 1,
    pp: int = 1,
    mod_config: MoDConfig | None = None,
    dtype: str = "auto",
    overwrite: bool = False,
    max_seq_len: int | None = None,
    seed: int = 1234,
    progress: bool = True,
    explicit_mod_fields: Collection[str] | None = None,
    router_weights: Mapping[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> ConversionSummary:
    """Convert a HF LLaMA-family checkpoint (or a GGUF file) into a megatron-mod checkpoint.

    Everything is validated before the first byte is written. The checkpoint holds full (TP=1)
    tensors in ``torch_dist`` format, which megatron-core loads with any TP/PP; ``tp``/``pp``
    choose the vocabulary padding, are checked against the model shape and recorded as the
    training default.

    Args:
        hf_dir: HF model directory (config.json + safetensors or pytorch_model*.bin), or a
            ``.gguf`` file (dequantized through transformers' GGUF loader first, see
            :mod:`megatron_mod.hf.gguf`).
        out_dir: checkpoint directory to create.
        tp: tensor-model-parallel size the checkpoint is prepared for.
        pp: pipeline-model-parallel size the checkpoint is prepared for.
        mod_config: routing settings (routers initialised per it); None converts a dense model.
        dtype: stored dtype (``auto`` keeps the source dtype; ``fp32``/``bf16``/``fp16``).
            Routers are always stored in fp32.
        overwrite: replace a non-empty ``out_dir``.
        max_seq_len: default ``max_position_embeddings``.
        seed: seed of the router initialisation.
        progress: show a tqdm progress bar.
        explicit_mod_fields: for a ``llama_mod`` source (a megatron-mod export), the
            ``MoDConfig`` fields of ``mod_config`` that override the source's own routing,
            threshold, capacity, gate, routed layers and top-k decode threshold; every other
            one of these is kept from the source (the CLI passes the ``--mod-*`` flags given
            on its command line). ``None``: none, the source's settings are all kept.
        router_weights: ``{layer: (weight [1, h], bias [1])}`` routers to store for routed
            layers (e.g. fitted by :mod:`megatron_mod.hf.calibrate`); they take precedence over
            the source's routers and the initialisation. Every key must be a routed layer.
        provenance: extra JSON-ready entries for the checkpoint metadata's ``source`` record.

    Returns:
        A :class:`ConversionSummary`.

    Raises:
        ConversionError: bad input (nothing is written).
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    check_output_dir(out_dir, overwrite)
    if hf_dir.is_file() and hf_dir.suffix == ".gguf":
        import tempfile

        from megatron_mod.hf.gguf import gguf_to_hf

        start = time.time()
        out_dir.absolute().parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir.absolute().parent, prefix=".gguf-") as tmp:
            gguf_to_hf(hf_dir, Path(tmp) / "hf", dtype=None if dtype == "auto" else dtype)
            summary = convert_hf_to_megatron(
                Path(tmp) / "hf", out_dir, tp, pp, mod_config, dtype, overwrite, max_seq_len,
                seed, progress, explicit_mod_fields, router_weights, provenance,
            )  # fmt: skip
        summary.source = str(hf_dir)
        summary.seconds = time.time() - start  # dequantization included
        summary.notes.insert(0, f"GGUF {hf_dir.name} dequantized with transformers' loader")
        return summary
    return _convert_hf_dir(
        hf_dir, out_dir, tp, pp, mod_config, dtype, max_seq_len, seed, progress,
        explicit_mod_fields, dict(router_weights or {}), dict(provenance or {}),
    )  # fmt: skip


def _convert_hf_dir(
    hf_dir: Path,
    out_dir: Path,
    tp: int,
    pp: int,
    mod_config: MoDConfig | None,
    dtype: str,
    max_seq_len: int | None,
    seed: int,
    progress: bool,
    explicit_mod_fields: Collection[str] | None,
    router_weights: dict[int, tuple[torch.Tensor, torch.Tensor]],
    provenance: dict[str, Any],
) -> ConversionSummary:
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    start = time.time()
    hf_config = read_json(hf_dir / "config.json")
    kept_mod = {}
    source_mod = source_mod_config(hf_config)
    if mod_config is not None and source_mod:
        explicit = set(explicit_mod_fields or ())
        kept_mod = {k: v for k, v in source_mod.items() if k not in explicit}
        try:
            mod_config = dataclasses.replace(mod_config, **kept_mod)
        except ValueError as err:
            raise ConversionError(f"{hf_dir / 'config.json'}: MoD settings: {err}") from err
    reader = HFCheckpointReader(hf_dir)
    store_dtype = None if dtype == "auto" else dtype_from_name(dtype)
    metadata = hf_config_to_metadata(
        hf_config,
        tp,
        pp,
        mod_config,
        store_dtype or torch.float32,
        max_seq_len,
        str(hf_dir / "config.json"),
    )
    dims = metadata.dims()
    routed = metadata.routed_layers()
    source_routers, source_dtype, notes = _validate_hf_tensors(reader, dims, routed)
    if store_dtype is None:
        store_dtype = source_dtype
    metadata.params_dtype = dtype_name(store_dtype)
    summary = ConversionSummary("HF -> Megatron", str(hf_dir), str(out_dir))
    summary.notes += notes
    if kept_mod:
        summary.notes.append(f"MoD settings kept from the source llama_mod config: {kept_mod}")
    if dims.tied:
        summary.notes.append("tied embeddings kept tied (share_embeddings_and_output_weights)")
    imported_routers = sorted(source_routers & set(routed))
    if imported_routers:
        summary.notes.append(f"router weights of layers {imported_routers} taken from the source")
    dropped = sorted(source_routers - set(routed))
    if dropped:
        summary.notes.append(f"source routers of non-routed layers {dropped} dropped")
    not_routed = sorted(set(router_weights) - set(routed))
    if not_routed:
        raise ConversionError(
            f"routers given for layers {not_routed}, which are not routed (routed: {routed})"
        )
    for layer, (weight, bias) in router_weights.items():
        if tuple(weight.shape) != (1, dims.hidden_size) or tuple(bias.shape) != (1,):
            raise ConversionError(
                f"router of layer {layer}: weight {tuple(weight.shape)} / bias "
                f"{tuple(bias.shape)}, expected (1, {dims.hidden_size}) / (1,)"
            )
    if router_weights:
        summary.notes.append(f"routers of layers {sorted(router_weights)} given by the caller")

    torch.manual_seed(seed)  # the routers' initialisation
    sharded, mappings = _planning_model(metadata, routed, "convert_hf_to_megatron")
    unknown = sorted(
        n for n, v in sharded.items() if not isinstance(v, ShardedObject) and n not in mappings
    )
    if unknown:
        raise RuntimeError(f"megatron parameters without a mapping: {unknown}")
    parts = _ordered_parts(sharded, dims.num_layers)
    summary.tensors = len(mappings)

    with staging_dir(out_dir) as tmp:
        writer = StreamingCheckpointWriter(tmp / iteration_dir_name(0))
        for part in progress_bar(parts, len(parts), "import", progress):
            items = {n: v for n, v in sharded.items() if _part_of(n) == part}
            for name, item in items.items():
                if isinstance(item, ShardedObject):
                    continue
                mapping = mappings[name]
                if name.endswith(("router.weight", "router.bias")):
                    given = router_weights.get(layer_index(name))
                    if given is not None:
                        data = given[0 if name.endswith("weight") else 1].detach().float().cpu()
                    elif layer_index(name) in source_routers:
                        data = reader.get(mapping.hf_names)[mapping.hf_names[0]].float()
                    else:
                        data = item.data.detach().float()  # MoDRouter's own initialisation
                else:
                    hf = reader.get(mapping.hf_names)
                    data = mapping.to_megatron([hf[n] for n in mapping.hf_names])
                    del hf
                    data = data.to(store_dtype).contiguous()
                if tuple(data.shape) != tuple(item.data.shape):
                    raise RuntimeError(f"{name}: mapped shape {tuple(data.shape)} != model's")
                summary.bytes_written += data.numel() * data.element_size()
                if isinstance(item, ShardedTensor):
                    items[name] = dataclasses.replace(item, data=data, dtype=data.dtype)
                else:  # ShardedTensorFactory: the tensors it builds take the data's dtype
                    items[name] = dataclasses.replace(item, data=data)
            writer.write_part(items)
            del items
        writer.finalize()
        tok = copy_tokenizer(hf_dir, tmp / "tokenizer")
        if tok:
            metadata.tokenizer_dir = "tokenizer"
        gen = hf_dir / "generation_config.json"
        metadata.source = {
            "converter": "megatron_mod.hf.convert.convert_hf_to_megatron",
            "hf_dir": str(hf_dir.absolute()),
            "generation_config": json.loads(gen.read_text()) if gen.is_file() else None,
            **provenance,
        }
        write_checkpoint_metadata(tmp, metadata)
        write_latest(tmp, 0)
    summary.seconds = time.time() - start
    summary.peak_rss_bytes = peak_rss_bytes()
    return summary


# ------------------------------------------------------------------------------ export


def convert_megatron_to_hf(
    ckpt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str | None = None,
    dense: bool = False,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
    iteration: int | None = None,
    progress: bool = True,
) -> ConversionSummary:
    """Export a megatron-mod checkpoint (any TP/PP it was trained with) to a HF directory.

    The MoD export is ``LlamaModForCausalLM`` (``model_type: llama_mod``, ``auto_map``, the
    modeling files copied in, load with ``trust_remote_code=True``); ``dense=True`` (or a dense
    checkpoint) exports a stock ``LlamaForCausalLM`` without routers.

    Args:
        ckpt_dir: megatron-mod checkpoint root.
        out_dir: HF directory to create.
        dtype: ``fp32``/``bf16``/``fp16`` (default: the checkpoint's stored dtype). Routers stay
            fp32.
        dense: export the plain LLaMA model.
        overwrite: replace a non-empty ``out_dir``.
        max_shard_size: safetensors shard size (e.g. ``5GB``).
        iteration: which iteration (default ``latest``).
        progress: show a tqdm progress bar.

    Returns:
        A :class:`ConversionSummary`.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    start = time.time()
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    check_output_dir(out_dir, overwrite)
    max_bytes = parse_size(max_shard_size)
    metadata = read_checkpoint_metadata(ckpt_dir)
    iter_dir = resolve_iteration_dir(ckpt_dir, iteration)
    out_dtype = dtype_from_name(dtype or metadata.params_dtype)
    mod = None if dense else metadata.mod_config
    dims = metadata.dims()
    routed = mod.routed_layer_indices(dims.num_layers) if mod else []
    stored_dtypes = checkpoint_tensor_dtypes(iter_dir)
    sharded, mappings = _planning_model(metadata, routed, "convert_megatron_to_hf")
    missing = sorted(
        {
            item.key
            for n, item in sharded.items()
            if not isinstance(item, ShardedObject) and item.key not in stored_dtypes
        }
    )
    if missing:
        raise ConversionError(
            f"{iter_dir}: checkpoint lacks keys {missing}; is {CONFIG_FILENAME} from the same "
            "model? (use --dense to export a checkpoint without routers)"
        )
    # Shapes too, before anything is written: a config that does not match the stored tensors
    # would otherwise fail midway through the export with a resharding error.
    stored_shapes = checkpoint_tensor_shapes(iter_dir)
    for name, m in mappings.items():
        key, layer = checkpoint_key(name)
        want = ((dims.num_layers,) if layer is not None else ()) + tuple(m.megatron_shape)
        if stored_shapes.get(key, want) != want:
            raise ConversionError(
                f"{iter_dir}: tensor {key} is stored with shape {list(stored_shapes[key])}, but "
                f"{ckpt_dir / CONFIG_FILENAME} describes {list(want)}; the config does not belong "
                "to this checkpoint"
            )

    def out_dtype_of(hf_name: str) -> torch.dtype:
        return torch.float32 if ".router." in hf_name else out_dtype

    plan = [
        (name, shape, out_dtype_of(name))
        for m in mappings.values()
        for name, shape in zip(m.hf_names, m.hf_shapes)
    ]
    summary = ConversionSummary("Megatron -> HF", str(ckpt_dir), str(out_dir))
    parts = _ordered_parts(mappings, dims.num_layers)
    with staging_dir(out_dir) as tmp:
        writer = StreamingSafetensorsWriter(tmp, plan, max_bytes)
        for part in progress_bar(parts, len(parts), "export", progress):
            items = {n: v for n, v in sharded.items() if _part_of(n) == part}
            loaded = read_checkpoint_tensors(iter_dir, items, stored_dtypes)
            for name in [n for n in mappings if _part_of(n) == part]:
                mapping: ParamMapping = mappings[name]
                tensors = mapping.to_hf(loaded.pop(name))
                for hf_name, tensor in zip(mapping.hf_names, tensors):
                    writer.write(hf_name, tensor.to(out_dtype_of(hf_name)))
                    summary.tensors += 1
                del tensors
            del loaded, items
        writer.close()
        summary.bytes_written = writer.total_size
        config = hf_config_dict(metadata, dims, out_dtype, mod)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        gen = (metadata.source or {}).get("generation_config")
        if gen:
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if mod is not None:
            here = Path(__file__).parent
            for name in HF_MODELING_FILES:
                if not (here / name).is_file():
                    raise ConversionError(f"{here / name} is missing from the megatron_mod install")
                shutil.copy2(here / name, tmp / name)
        if metadata.tokenizer_dir:
            tok_dir = ckpt_dir / metadata.tokenizer_dir
            if not tok_dir.is_dir():
                summary.notes.append(f"tokenizer dir {tok_dir} not found; no tokenizer copied")
            else:
                copied = copy_tokenizer(tok_dir, tmp)
                summary.notes.append(f"tokenizer files copied: {copied}")
    summary.seconds = time.time() - start
    summary.peak_rss_bytes = peak_rss_bytes()
    return summary
