"""Streaming HF LLaMA <-> megatron-mod checkpoint conversion (logic behind the two ``tools/`` CLIs).

Both directions use :mod:`megatron_mod.hf.mapping` for every name and layout fact, validate all
inputs before writing anything, stream tensors one transformer layer at a time, and write into a
hidden temp directory that is renamed into place at the end (a failed run leaves no output).

Memory: import holds one layer's megatron tensors plus the HF tensors of the parameter being
converted; export holds one layer's checkpoint tensors plus one converted parameter. Shards of the
output are written incrementally (the safetensors header is planned up front), so the output shard
size does not change peak memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import struct
import time
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_mod.checkpointing import (
    CONFIG_FILENAME,
    CheckpointMetadata,
    StreamingCheckpointWriter,
    build_model_from_metadata,
    checkpoint_tensor_dtypes,
    checkpoint_tensor_shapes,
    dtype_from_name,
    dtype_name,
    iteration_dir_name,
    model_sharded_state_dict,
    read_checkpoint_metadata,
    read_checkpoint_tensors,
    resolve_iteration_dir,
    write_checkpoint_metadata,
    write_latest,
)
from megatron_mod.config import MoDConfig
from megatron_mod.hf.mapping import (
    LlamaDims,
    ParamMapping,
    checkpoint_key,
    hf_param_shapes,
    layer_index,
    padded_vocab_size,
    param_mappings,
)

__all__ = [
    "ConversionError",
    "HFCheckpointReader",
    "check_output_dir",
    "hf_config_to_metadata",
    "convert_hf_to_megatron",
    "convert_megatron_to_hf",
    "parse_size",
    "TOKENIZER_FILES",
    "MOD_AUTO_MAP",
]

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "LlamaModForCausalLM")
MOD_AUTO_MAP = {
    "AutoConfig": "configuration_llama_mod.LlamaModConfig",
    "AutoModelForCausalLM": "modeling_llama_mod.LlamaModForCausalLM",
}
HF_MODELING_FILES = ("configuration_llama_mod.py", "modeling_llama_mod.py")
# Tensors some HF LLaMA checkpoints carry that are recomputed, not learned.
_IGNORED_HF_TENSORS = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_SAFETENSORS_TO_TORCH = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F64": torch.float64,
}


class ConversionError(ValueError):
    """Bad input to a converter; the message names the file/key/flag and what to do."""


def parse_size(text: str | int) -> int:
    """``5GB``, ``500MB``, ``2GiB``, ``1000000`` -> bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ConversionError(f"--max-shard-size {text!r}: use e.g. 5GB, 500MB or a byte count")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(number * base**power)


def check_output_dir(out_dir: Path, overwrite: bool, flag: str = "--out-dir") -> None:
    """Refuse a non-empty output directory unless ``overwrite`` (checked before any work)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConversionError(f"{flag} {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ConversionError(
            f"{flag} {out_dir} is not empty; pass --overwrite to replace it or choose another "
            "directory"
        )


@contextlib.contextmanager
def _staging_dir(out_dir: Path) -> Iterator[Path]:
    """A hidden sibling temp dir that replaces ``out_dir`` on success and is removed on failure."""
    out_dir = out_dir.absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (logs redirected to a file stay readable)
    return tqdm(iterable, total=total, desc=desc, unit="part", disable=None)


def _peak_rss_bytes() -> int:
    """Peak RSS of this process image.

    ``VmHWM`` rather than ``ru_maxrss``: Linux carries ``ru_maxrss`` across ``fork`` + ``exec``,
    so a converter started from a large parent process would report the parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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


# ------------------------------------------------------------------------------ HF reading


class HFCheckpointReader:
    """Lazy access to the tensors of a HF checkpoint directory.

    Reads safetensors (single file or sharded with ``model.safetensors.index.json``), or
    ``pytorch_model*.bin`` through ``torch.load(weights_only=True)`` (no arbitrary pickles).
    Opening and listing only parses headers; :meth:`get` reads just the requested tensors.
    """

    def __init__(self, hf_dir: str | os.PathLike):
        self.hf_dir = Path(hf_dir)
        self.weight_map: dict[str, str] = {}
        self.bin_loads = 0
        """How many times a ``.bin`` shard was loaded (once per shard)."""
        self._bin_cache: dict[str, dict[str, torch.Tensor]] = {}
        self._mapped: set[str] = set()
        self.format = self._discover()
        self._aliases: dict[str, str] = {}

    def _discover(self) -> str:
        d = self.hf_dir
        for index_name, fmt in (
            ("model.safetensors.index.json", "safetensors"),
            ("pytorch_model.bin.index.json", "bin"),
        ):
            index = d / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError) as err:
                    raise ConversionError(f"{index}: not a valid index file ({err})") from err
                for name, file in weight_map.items():
                    if not (d / file).is_file():
                        raise ConversionError(
                            f"{index} maps {name} to {file}, which is missing from {d}"
                        )
                self.weight_map = dict(weight_map)
                return fmt
        for file, fmt in (("model.safetensors", "safetensors"), ("pytorch_model.bin", "bin")):
            if (d / file).is_file():
                for name in self._file_keys(file, fmt):
                    self.weight_map[name] = file
                return fmt
        raise ConversionError(
            f"no weights in {d}: expected model.safetensors[.index.json] or "
            "pytorch_model.bin[.index.json]"
        )

    def _file_keys(self, file: str, fmt: str) -> list[str]:
        if fmt == "safetensors":
            from safetensors import safe_open

            with safe_open(self.hf_dir / file, framework="pt") as f:
                return list(f.keys())
        return list(self._load_bin(file).keys())

    def _load_bin(self, file: str) -> dict[str, torch.Tensor]:
        # A .bin file can only be loaded whole, and one layer's tensors may sit in several
        # shards: memory-mapped shards stay open (file-backed pages, no resident copy), so each
        # is loaded once. A legacy (non-zip) file cannot be mapped and is read into memory:
        # only the last one is kept.
        if file in self._bin_cache:
            return self._bin_cache[file]
        path = self.hf_dir / file
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            # Legacy (non-zip) files cannot be memory-mapped; still no arbitrary pickles.
            state = torch.load(path, map_location="cpu", weights_only=True)
            self._bin_cache = {k: v for k, v in self._bin_cache.items() if k in self._mapped}
        else:
            self._mapped.add(file)
        self.bin_loads += 1
        self._bin_cache[file] = state
        return state

    def alias(self, name: str, source: str) -> None:
        """Serve ``name`` from tensor ``source`` (tied embeddings: lm_head from embed_tokens)."""
        self._aliases[name] = source

    def names(self) -> list[str]:
        return list(self.weight_map) + [a for a in self._aliases if a not in self.weight_map]

    def shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype, str]]:
        """name -> (shape, dtype, file) for every stored tensor (headers only)."""
        out = {}
        by_file: dict[str, list[str]] = {}
        for name, file in self.weight_map.items():
            by_file.setdefault(file, []).append(name)
        for file, names in by_file.items():
            if self.format == "safetensors":
                from safetensors import safe_open

                with safe_open(self.hf_dir / file, framework="pt") as f:
                    present = set(f.keys())
                    for name in names:
                        if name not in present:
                            raise ConversionError(
                                f"{self.hf_dir / file}: tensor {name} is listed in the index but "
                                "not stored in this file; the checkpoint is incomplete"
                            )
                        sl = f.get_slice(name)
                        dtype = _SAFETENSORS_TO_TORCH.get(sl.get_dtype(), None)
                        out[name] = (tuple(sl.get_shape()), dtype, file)
            else:
                state = self._load_bin(file)
                for name in names:
                    if name not in state:
                        raise ConversionError(f"{self.hf_dir / file}: tensor {name} not found")
                    out[name] = (tuple(state[name].shape), state[name].dtype, file)
                del state
        return out

    def get(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read the named tensors (file by file; each file is closed before returning)."""
        wanted = {n: self._aliases.get(n, n) for n in names}
        by_file: dict[str, set[str]] = {}
        for source in wanted.values():
            by_file.setdefault(self.weight_map[source], set()).add(source)
        loaded: dict[str, torch.Tensor] = {}
        for file, sources in by_file.items():
            if self.format == "safetensors":
                from safetensors import safe_open

                with safe_open(self.hf_dir / file, framework="pt") as f:
                    for s in sources:
                        loaded[s] = f.get_tensor(s)
            else:
                state = self._load_bin(file)
                for s in sources:
                    loaded[s] = state[s].clone()
                del state
        return {n: loaded[s] for n, s in wanted.items()}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConversionError(f"{path} not found: is {path.parent} a Hugging Face model directory?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from err


def _detect_preset(shape: dict[str, Any]) -> str | None:
    from megatron_mod.models import PRESETS

    for name, preset in PRESETS.items():
        if all(shape.get(k) == v for k, v in preset.items()):
            return name
    return None


# Families and their HF classes: (architecture, model_type, q/k/v biases).
FAMILIES = {
    "LlamaForCausalLM": ("llama", False),
    "LlamaModForCausalLM": ("llama_mod", False),
    "MistralForCausalLM": ("mistral", False),
    "Qwen2ForCausalLM": ("qwen2", True),
}
# config.json keys read and checked below (shape, RoPE, biases, attention window, MoD).
_MODEL_KEYS = {
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "rms_norm_eps", "hidden_act", "rope_theta", "rope_scaling", "rope_parameters",
    "tie_word_embeddings", "attention_bias", "mlp_bias", "max_position_embeddings",
    "sliding_window", "use_sliding_window", "max_window_layers", "layer_types",
    "attention_qkv_bias",
    "mod_routing", "mod_threshold", "mod_capacity", "mod_gate", "mod_routed_layers",
    "mod_topk_decode_threshold",
}  # fmt: skip
# Keys that never change a causal LM's forward pass (ids, dtypes, bookkeeping, training-only
# dropout, HF's pretraining_tp which only splits the same matmuls).
_NEUTRAL_KEYS = {
    "_name_or_path", "_model_name_or_path", "_commit_hash", "auto_map", "transformers_version",
    "torch_dtype", "dtype", "unk_token_id",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "use_cache", "initializer_range", "attention_dropout", "pretraining_tp", "tokenizer_class",
    "output_attentions", "output_hidden_states", "return_dict", "torchscript", "id2label",
    "label2id", "problem_type", "finetuning_task", "task_specific_params", "prefix",
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "tie_encoder_decoder",
    "chunk_size_feed_forward", "pruned_heads", "cross_attention_hidden_size",
    "use_return_dict", "embd_pdrop", "resid_pdrop", "_attn_implementation_autoset",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "temperature",
    "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "num_beam_groups", "diversity_penalty",
    "tf_legacy_loss", "use_bfloat16", "architectures_version",
}  # fmt: skip
_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}  # fmt: skip


def _rope_settings(hf_config: dict[str, Any], config_path: str) -> tuple[float, float | None]:
    """(rope theta, LLaMA-3 scaling factor or None) from a transformers 4 or 5 config.

    transformers 4 writes ``rope_theta`` and ``rope_scaling``; transformers 5 writes
    ``rope_parameters`` (``rope_type``, ``rope_theta`` and the scaling fields in one dict).
    """
    params = hf_config.get("rope_parameters")
    scaling = hf_config.get("rope_scaling")
    theta = hf_config.get("rope_theta")
    if params is not None:
        if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
            raise ConversionError(
                f"{config_path}: rope_parameters={params} (per-layer RoPE) is not supported"
            )
        theta = params.get("rope_theta", theta)
        if params.get("rope_type", params.get("type", "default")) != "default":
            scaling = params
    if theta is None:
        theta = 10000.0
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise ConversionError(f"{config_path}: rope_theta={theta!r} must be a positive number")
    if not scaling:
        return float(theta), None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise ConversionError(
            f"{config_path}: RoPE scaling of type {kind!r} is not supported: megatron-core "
            "implements LLaMA-3 scaling (rope_type 'llama3') only, and converting without the "
            "scaling would change the model"
        )
    odd = {
        k: scaling.get(k)
        for k, v in _LLAMA3_ROPE.items()
        if scaling.get(k) is None or float(scaling[k]) != v
    }
    factor = scaling.get("factor")
    if odd or not isinstance(factor, (int, float)) or not factor >= 1:
        raise ConversionError(
            f"{config_path}: llama3 RoPE scaling {scaling} is not supported: megatron-core "
            f"fixes low_freq_factor=1, high_freq_factor=4, original_max_position_embeddings=8192 "
            f"and needs factor >= 1 (this config has factor={factor!r}"
            + (f", {odd}" if odd else "")
            + ")"
        )
    return float(theta), float(factor)


def _check_family(hf_config: dict[str, Any], config_path: str) -> tuple[str, bool]:
    """The model family (``FAMILIES``) and whether q/k/v carry biases; refuses what differs."""
    archs = hf_config.get("architectures") or []
    found = [a for a in archs if a in FAMILIES]
    if not found:
        raise ConversionError(
            f"{config_path}: architectures={archs} is not supported; this converter handles "
            f"{' / '.join(FAMILIES)} (LLaMA-2/3.x, Mistral, Qwen2/2.5 and megatron-mod exports)"
        )
    family, qkv_bias = FAMILIES[found[0]]
    generic = set()
    try:
        import transformers

        base = getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig
        generic = set(base().to_dict())
    except Exception:  # noqa: BLE001 - the fixed lists below still apply
        pass
    unknown = sorted(set(hf_config) - _MODEL_KEYS - _NEUTRAL_KEYS - generic)
    if unknown:
        raise ConversionError(
            f"{config_path}: unknown config keys {unknown}; they may change the model's "
            "computation, which this converter would not reproduce. Known model keys: "
            f"{sorted(k for k in _MODEL_KEYS if not k.startswith('mod_'))}. If a key does not "
            "affect the forward pass, remove it from config.json and convert again"
        )
    act = hf_config.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(
            f"{config_path}: hidden_act={act!r}; only 'silu' (SwiGLU) is supported"
        )
    if hf_config.get("mlp_bias"):
        raise ConversionError(f"{config_path}: mlp_bias=true is not supported")
    if hf_config.get("attention_bias"):
        raise ConversionError(
            f"{config_path}: attention_bias=true (biases on q/k/v and o_proj) is not supported; "
            "Qwen2-style q/k/v biases are (Qwen2ForCausalLM)"
        )
    if family == "llama_mod" and hf_config.get("attention_qkv_bias"):
        qkv_bias = True
    window = hf_config.get("sliding_window")
    if family == "qwen2":
        window = window if hf_config.get("use_sliding_window") else None
    if family in ("mistral", "qwen2") and window is not None:
        raise ConversionError(
            f"{config_path}: sliding-window attention (sliding_window={window}) is not "
            "supported: routed layers attend over the compacted kept tokens, where a window "
            "over original positions is not implemented. Mistral v0.2+ and Qwen2.5 "
            "checkpoints have no window (sliding_window null / use_sliding_window false)"
        )
    kinds = set(hf_config.get("layer_types") or ["full_attention"])
    if kinds != {"full_attention"}:
        raise ConversionError(
            f"{config_path}: layer_types {sorted(kinds)}: only full attention is supported"
        )
    return family, qkv_bias


def source_mod_config(hf_config: dict[str, Any]) -> dict[str, Any] | None:
    """The MoD settings a ``llama_mod`` export carries (``MoDConfig`` field -> value), or None."""
    if "LlamaModForCausalLM" not in (hf_config.get("architectures") or []):
        return None
    out = {}
    for field_name in ("routing", "threshold", "capacity", "gate", "routed_layers"):
        if hf_config.get(f"mod_{field_name}") is not None:
            out[field_name] = hf_config[f"mod_{field_name}"]
    if hf_config.get("mod_topk_decode_threshold") is not None:
        out["topk_decode_threshold"] = hf_config["mod_topk_decode_threshold"]
    return out


def hf_config_to_metadata(
    hf_config: dict[str, Any],
    tp: int,
    pp: int,
    mod_config: MoDConfig | None,
    params_dtype: torch.dtype,
    max_seq_len: int | None = None,
    config_path: str = "config.json",
) -> CheckpointMetadata:
    """Validate a HF ``config.json`` (LLaMA family) for a TP/PP layout and turn it into metadata.

    Raises:
        ConversionError: naming the config field or flag at fault and what to do.
    """

    def need(key: str):
        if key not in hf_config:
            raise ConversionError(f"{config_path}: missing required field {key!r}")
        return hf_config[key]

    _, qkv_bias = _check_family(hf_config, config_path)
    rope_theta, rope_factor = _rope_settings(hf_config, config_path)
    tied = bool(hf_config.get("tie_word_embeddings", False))

    layers, hidden = int(need("num_hidden_layers")), int(need("hidden_size"))
    heads = int(need("num_attention_heads"))
    groups = int(hf_config.get("num_key_value_heads") or heads)
    ffn, vocab = int(need("intermediate_size")), int(need("vocab_size"))
    head_dim = int(hf_config.get("head_dim") or hidden // heads)
    checks = [
        ("--tp", tp, "num_attention_heads", heads),
        ("--tp", tp, "num_key_value_heads", groups),
        ("--tp", tp, "intermediate_size", ffn),
        ("--pp", pp, "num_hidden_layers", layers),
    ]
    for flag, size, name, value in checks:
        if size < 1 or value % size:
            ok = [d for d in range(1, value + 1) if value % d == 0]
            raise ConversionError(
                f"{flag} {size} does not divide {name}={value} ({config_path}); use one of {ok}"
            )
    if heads % groups:
        raise ConversionError(
            f"{config_path}: num_key_value_heads={groups} must divide num_attention_heads={heads}"
        )
    if mod_config is not None:
        try:
            mod_config.routed_layer_indices(layers)
        except ValueError as err:
            raise ConversionError(f"--mod-routed-layers: {err}") from err

    shape = dict(
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=groups,
        ffn_hidden_size=ffn,
        layernorm_epsilon=float(hf_config.get("rms_norm_eps", 1e-6)),
    )
    preset = _detect_preset(shape)
    overrides: dict[str, Any] = dict(shape)
    overrides["rotary_base"] = rope_theta
    if rope_factor is not None:
        overrides.update(rope_scaling=True, rope_scaling_factor=rope_factor)
    if tied:
        overrides["share_embeddings_and_output_weights"] = True
    if qkv_bias:
        overrides["add_qkv_bias"] = True
    if head_dim * heads != hidden:
        overrides["kv_channels"] = head_dim
    if preset is None:
        preset = "custom"
    seq = int(max_seq_len or hf_config.get("max_position_embeddings") or 4096)
    return CheckpointMetadata(
        preset=preset,
        model_overrides=overrides,
        mod=mod_config.to_dict() if mod_config is not None else None,
        vocab_size=vocab,
        padded_vocab_size=padded_vocab_size(vocab, tp),
        max_seq_len=seq,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=dtype_name(params_dtype),
        hf_config=dict(hf_config),
    )


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


def _copy_tokenizer(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            dst.mkdir(exist_ok=True)
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


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
                seed, progress, explicit_mod_fields,
            )  # fmt: skip
        summary.source = str(hf_dir)
        summary.seconds = time.time() - start  # dequantization included
        summary.notes.insert(0, f"GGUF {hf_dir.name} dequantized with transformers' loader")
        return summary
    return _convert_hf_dir(
        hf_dir, out_dir, tp, pp, mod_config, dtype, max_seq_len, seed, progress,
        explicit_mod_fields,
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
) -> ConversionSummary:
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    start = time.time()
    hf_config = _read_json(hf_dir / "config.json")
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

    _init_conversion_process("convert_hf_to_megatron")
    torch.manual_seed(seed)
    model = build_model_from_metadata(
        metadata,
        meta_device=True,
        use_transformer_engine=False,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
    )
    sharded = model_sharded_state_dict(model)
    mappings = {m.megatron_name: m for m in param_mappings(dims, routed)}
    unknown = sorted(
        n for n, v in sharded.items() if not isinstance(v, ShardedObject) and n not in mappings
    )
    if unknown:
        raise RuntimeError(f"megatron parameters without a mapping: {unknown}")
    parts = _ordered_parts(sharded, dims.num_layers)
    summary.tensors = len(mappings)

    with _staging_dir(out_dir) as tmp:
        writer = StreamingCheckpointWriter(tmp / iteration_dir_name(0))
        for part in _progress(parts, len(parts), "import", progress):
            items = {n: v for n, v in sharded.items() if _part_of(n) == part}
            for name, item in items.items():
                if isinstance(item, ShardedObject):
                    continue
                mapping = mappings[name]
                if name.endswith(("router.weight", "router.bias")):
                    if layer_index(name) in source_routers:
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
        tok = _copy_tokenizer(hf_dir, tmp / "tokenizer")
        if tok:
            metadata.tokenizer_dir = "tokenizer"
        gen = hf_dir / "generation_config.json"
        metadata.source = {
            "converter": "megatron_mod.hf.convert.convert_hf_to_megatron",
            "hf_dir": str(hf_dir.absolute()),
            "generation_config": json.loads(gen.read_text()) if gen.is_file() else None,
        }
        write_checkpoint_metadata(tmp, metadata)
        write_latest(tmp, 0)
    summary.seconds = time.time() - start
    summary.peak_rss_bytes = _peak_rss_bytes()
    return summary


# ------------------------------------------------------------------------------ export


class _StreamingSafetensorsWriter:
    """Writes planned safetensors shards tensor by tensor (header computed up front)."""

    def __init__(
        self, out_dir: Path, plan: list[tuple[str, tuple[int, ...], torch.dtype]], max_bytes
    ):
        self.out_dir = out_dir
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for entry in plan:
            nbytes = math.prod(entry[1]) * torch.empty((), dtype=entry[2]).element_size()
            if shards[-1] and size + nbytes > max_bytes:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += nbytes
        n = len(shards)
        self.files = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.shards = shards
        self.weight_map = {e[0]: f for f, s in zip(self.files, shards) for e in s}
        self.total_size = 0
        self._order = [e for s in shards for e in s]
        self._next = 0
        self._shard = -1
        self._handle = None

    def _open_shard(self, index: int) -> None:
        if self._handle:
            self._handle.close()
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in self.shards[index]:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {
                "dtype": _SAFETENSORS_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data must start 8-byte aligned
        self._handle = open(self.out_dir / self.files[index], "wb")  # noqa: SIM115
        self._handle.write(struct.pack("<Q", len(raw)))
        self._handle.write(raw)
        self._shard = index

    def write(self, name: str, tensor: torch.Tensor) -> None:
        exp_name, shape, dtype = self._order[self._next]
        if name != exp_name or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise RuntimeError(
                f"export wrote {name} {tuple(tensor.shape)} {tensor.dtype}, planned {exp_name} "
                f"{shape} {dtype}"
            )
        shard = self.files.index(self.weight_map[name])
        if shard != self._shard:
            self._open_shard(shard)
        data = tensor.detach().contiguous().view(-1).view(torch.uint8).numpy()
        self._handle.write(memoryview(data))
        self.total_size += data.nbytes
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            raise RuntimeError(f"export wrote {self._next} of {len(self._order)} planned tensors")
        if self._handle:
            self._handle.close()
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            text = json.dumps(index, indent=2, sort_keys=True) + "\n"
            (self.out_dir / "model.safetensors.index.json").write_text(text)


# Keys the export sets itself (or drops) rather than copying from the source config.
_EXPORT_DROPPED = {
    "_name_or_path", "transformers_version", "auto_map", "_commit_hash", "torch_dtype", "dtype",
    "rope_parameters", "rope_scaling", "rope_theta", "attention_qkv_bias",
}  # fmt: skip
_WINDOW_KEYS = ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types")


def _hf_config_dict(
    metadata: CheckpointMetadata, dims: LlamaDims, dtype: torch.dtype, mod: MoDConfig | None
) -> dict[str, Any]:
    """config.json of the export: the source config's ids and names, the checkpoint's model.

    RoPE is written as ``rope_theta`` + ``rope_scaling``, which transformers 4 reads directly
    and transformers 5 converts to its ``rope_parameters``. A dense export keeps the source's
    architecture (LLaMA, Mistral, Qwen2); a MoD export is ``llama_mod``.
    """
    import transformers

    source = dict(metadata.hf_config or {})
    tc = metadata.transformer_config(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    cfg = {k: v for k, v in source.items() if k not in _EXPORT_DROPPED and not k.startswith("mod_")}
    rope_scaling = None
    if getattr(tc, "rope_scaling", False):
        rope_scaling = {
            "rope_type": "llama3",
            "factor": float(tc.rope_scaling_factor),
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    cfg.update(
        hidden_size=dims.hidden_size,
        intermediate_size=dims.ffn_hidden_size,
        num_hidden_layers=dims.num_layers,
        num_attention_heads=dims.num_attention_heads,
        num_key_value_heads=dims.num_query_groups,
        head_dim=dims.head_dim,
        vocab_size=dims.vocab_size,
        rms_norm_eps=tc.layernorm_epsilon,
        rope_theta=float(getattr(tc, "rotary_base", 10000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(source.get("max_position_embeddings", metadata.max_seq_len)),
        hidden_act="silu",
        tie_word_embeddings=dims.tied,
        attention_bias=False,
        mlp_bias=False,
    )
    # transformers >= 4.56 calls it "dtype", older versions "torch_dtype": the installed name.
    major_minor = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    cfg["dtype" if major_minor >= (4, 56) else "torch_dtype"] = dtype_name(dtype)
    archs = source.get("architectures") or ["LlamaForCausalLM"]
    family = next((FAMILIES[a][0] for a in archs if a in FAMILIES), "llama")
    if mod is None:
        if family == "llama_mod":  # a dense export of a MoD model is a plain LLaMA
            family = "llama"
        if family == "llama":
            for key in _WINDOW_KEYS:
                cfg.pop(key, None)
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}.get(
            family, "Qwen2ForCausalLM"
        )
        cfg.update(model_type=family, architectures=[arch])
        if family == "qwen2":
            cfg.pop("attention_bias", None)
            cfg.pop("mlp_bias", None)
    else:
        for key in _WINDOW_KEYS:
            cfg.pop(key, None)
        cfg.update(
            model_type="llama_mod",
            architectures=["LlamaModForCausalLM"],
            auto_map=dict(MOD_AUTO_MAP),
            attention_qkv_bias=dims.qkv_bias,
            mod_routing=mod.routing,
            mod_threshold=mod.threshold,
            mod_capacity=mod.capacity,
            mod_gate=mod.gate,
            mod_routed_layers=mod.routed_layer_indices(dims.num_layers),
        )
        if mod.topk_decode_threshold is not None:
            cfg["mod_topk_decode_threshold"] = mod.topk_decode_threshold
    cfg["transformers_version"] = transformers.__version__
    return cfg


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
    _init_conversion_process("convert_megatron_to_hf")
    model = build_model_from_metadata(
        metadata,
        dense=mod is None,
        meta_device=True,
        use_transformer_engine=False,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
    )
    sharded = model_sharded_state_dict(model)
    mappings = {m.megatron_name: m for m in param_mappings(dims, routed)}
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
    with _staging_dir(out_dir) as tmp:
        writer = _StreamingSafetensorsWriter(tmp, plan, max_bytes)
        for part in _progress(parts, len(parts), "export", progress):
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
        config = _hf_config_dict(metadata, dims, out_dtype, mod)
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
                copied = _copy_tokenizer(tok_dir, tmp)
                summary.notes.append(f"tokenizer files copied: {copied}")
    summary.seconds = time.time() - start
    summary.peak_rss_bytes = _peak_rss_bytes()
    return summary
