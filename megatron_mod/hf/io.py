"""Reading and writing Hugging Face checkpoints: the file side of the converters.

:class:`HFCheckpointReader` gives lazy, per-tensor access to safetensors or ``pytorch_model*.bin``
checkpoints (headers only until a tensor is asked for); :class:`StreamingSafetensorsWriter`
writes planned safetensors shards tensor by tensor. Outputs go to a hidden staging directory
that is renamed into place at the end (:func:`staging_dir`), so a failed run leaves nothing.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from megatron_mod.errors import MegatronModError

__all__ = [
    "ConversionError",
    "HFCheckpointReader",
    "StreamingSafetensorsWriter",
    "TOKENIZER_FILES",
    "check_output_dir",
    "copy_tokenizer",
    "parse_size",
    "peak_rss_bytes",
    "progress_bar",
    "read_json",
    "staging_dir",
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
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
SAFETENSORS_TO_TORCH = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F64": torch.float64,
}


class ConversionError(MegatronModError, ValueError):
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
def staging_dir(out_dir: Path) -> Iterator[Path]:
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


def progress_bar(iterable, total: int, desc: str, enabled: bool):
    """``iterable`` with a tqdm bar when ``enabled`` (and stderr is a terminal)."""
    if not enabled:
        return iterable
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (logs redirected to a file stay readable)
    return tqdm(iterable, total=total, desc=desc, unit="part", disable=None)


def peak_rss_bytes() -> int:
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


# ------------------------------------------------------------------------------ reading


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
                        dtype = SAFETENSORS_TO_TORCH.get(sl.get_dtype(), None)
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


def read_json(path: Path) -> dict[str, Any]:
    """A ``config.json``-like file, or a :class:`ConversionError` naming it."""
    if not path.is_file():
        raise ConversionError(f"{path} not found: is {path.parent} a Hugging Face model directory?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from err


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files of ``src`` into ``dst``; returns the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            dst.mkdir(exist_ok=True)
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


# ------------------------------------------------------------------------------ writing


class StreamingSafetensorsWriter:
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
                "dtype": SAFETENSORS_DTYPES[dtype],
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
