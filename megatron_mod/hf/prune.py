"""ShortGPT-style layer removal: score each decoder layer, drop the least important whole layers.

The block-influence score of layer ``i`` (Men et al., 2024, "ShortGPT: Layers in Large Language
Models are More Redundant Than You Expect") is one minus the mean cosine similarity between the
layer's input and output hidden states, averaged over every token of held-out text::

    BI_i = 1 - E_t[ cos(x_i[t], x_{i+1}[t]) ]

A layer that barely changes its residual stream scores near 0 and is removed first. The pruned
model is an ordinary Hugging Face LLaMA directory: ``num_hidden_layers`` updated, the remaining
layers renumbered 0..n-1, every other tensor (embeddings, final norm, ``lm_head`` or its absence
when the embeddings are tied) copied bit for bit, the tokenizer and generation config copied.
The directory is written under a temporary name and renamed into place, so a reader sees the old
directory or the complete new one, never half of it.

This is the whole-layer baseline MoD is compared against at equal compute: removing ``r`` of
``L`` layers computes a fraction ``c_eff = (L - r) / L`` of the (token, layer) pairs.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from megatron_mod.data.documents import DocumentError, read_token_stream
from megatron_mod.errors import MegatronModError

__all__ = [
    "PruneError",
    "PrunePlan",
    "block_influence",
    "choose_layers",
    "load_text_windows",
    "prune_hf_llama",
    "write_pruned_dir",
]

_LAYER_KEY = re.compile(r"^(model\.layers\.)(\d+)(\..+)$")
_WEIGHT_FILES = re.compile(r"^(model.*\.safetensors|model\.safetensors\.index\.json)$")
_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


class PruneError(MegatronModError, ValueError):
    """Bad input to the pruning tool (the message names the file or option and what to do)."""


@dataclass
class PrunePlan:
    """What was scored and removed.

    Attributes:
        num_layers: layers of the source model.
        scores: block-influence score per source layer (index = layer).
        removed: source layer indices removed, ascending.
        kept: source layer indices kept, ascending (new layer ``j`` is source layer ``kept[j]``).
        keep_compute: the requested fraction of layers to keep.
        c_eff: the fraction actually kept, ``len(kept) / num_layers``.
        scored_tokens: tokens whose hidden states entered the scores.
    """

    num_layers: int
    scores: list[float]
    removed: list[int]
    kept: list[int]
    keep_compute: float
    c_eff: float
    scored_tokens: int = 0

    def to_dict(self) -> dict:
        """JSON-ready copy."""
        return asdict(self)


# --------------------------------------------------------------------------- data


def load_text_windows(
    path: str | os.PathLike,
    tokenizer,
    seq_length: int,
    num_sequences: int,
    key: str = "text",
) -> torch.Tensor:
    """``[n, seq_length]`` token windows of a JSONL or text file, documents joined by EOS.

    Args:
        path: JSONL/Parquet file (``{key: text}`` per record) or a plain text file.
        tokenizer: a Hugging Face tokenizer.
        seq_length: tokens per window.
        num_sequences: windows wanted; fewer are returned (at least one) when the text is short.
        key: JSONL text field.

    Raises:
        PruneError: the file is missing, malformed or holds less than one window of tokens.
    """
    path = Path(path)
    if not path.is_file():
        raise PruneError(f"--data {path}: file not found")
    try:
        tokens = read_token_stream(path, tokenizer, seq_length * num_sequences, key)
    except DocumentError as err:
        raise PruneError(f"--data {err}") from None
    n = min(num_sequences, len(tokens) // seq_length)
    if n == 0:
        raise PruneError(
            f"--data {path}: {len(tokens)} tokens, fewer than one window of {seq_length}; "
            f"pass more text or a smaller --seq-length"
        )
    return torch.tensor(tokens[: n * seq_length], dtype=torch.long).view(n, seq_length)


# --------------------------------------------------------------------------- scores


def _decoder_layers(model) -> torch.nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise PruneError(
            f"{type(model).__name__}: no model.layers list; only LLaMA-family decoder models "
            f"are supported"
        )
    return layers


def block_influence(model, windows: torch.Tensor, batch_size: int = 1, progress=None) -> list:
    """Block-influence score of every decoder layer on ``windows``.

    Each layer's input and output hidden states are captured with forward hooks (so the result
    does not depend on how a transformers version reports ``hidden_states``), and the per-token
    cosine similarities are summed in float64 over all windows.

    Args:
        model: a Hugging Face ``LlamaForCausalLM`` (or same-shaped) model.
        windows: ``[n, seq]`` token ids.
        batch_size: windows per forward.
        progress: optional callable wrapping the batch iterator (e.g. ``tqdm``).

    Returns:
        ``1 - mean cos(input, output)`` per layer, as Python floats.
    """
    layers = _decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    inputs: dict[int, torch.Tensor] = {}

    def pre_hook(index):
        def hook(_module, args, kwargs):
            inputs[index] = args[0] if args else kwargs["hidden_states"]

        return hook

    def post_hook(index):
        def hook(_module, _args, _kwargs, output):
            out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(
                inputs.pop(index).double(), out.double(), dim=-1
            )
            sums[index] += cos.sum()

        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(post_hook(i), with_kwargs=True))
    starts = range(0, windows.shape[0], batch_size)
    try:
        was_training = model.training
        model.eval()
        with torch.inference_mode():
            for start in progress(starts) if progress else starts:
                ids = windows[start : start + batch_size]
                model(input_ids=ids, use_cache=False)
                count += ids.numel()
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return [1.0 - float(s) / count for s in sums]


def choose_layers(scores: Sequence[float], keep_compute: float) -> tuple[list[int], list[int]]:
    """Which layers to keep so that about ``keep_compute`` of them remain.

    Keeps ``floor(keep_compute * L + 0.5)`` layers (at least one), removing the lowest scores;
    ties go to the later layer (removed first), so the choice is deterministic.

    Returns:
        (kept, removed): ascending source layer indices.

    Raises:
        PruneError: ``keep_compute`` is not in (0, 1].
    """
    if not 0.0 < keep_compute <= 1.0 or math.isnan(keep_compute):
        raise PruneError(f"--keep-compute must be in (0, 1], got {keep_compute}")
    num_layers = len(scores)
    # Half rounds up (more compute kept): the nearest count to the request, never below it on ties.
    n_keep = max(1, min(num_layers, math.floor(keep_compute * num_layers + 0.5)))
    order = sorted(range(num_layers), key=lambda i: (scores[i], -i))
    removed = sorted(order[: num_layers - n_keep])
    kept = [i for i in range(num_layers) if i not in set(removed)]
    return kept, removed


# --------------------------------------------------------------------------- writing


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    if any((model_dir / name).exists() for name in _PICKLE_WEIGHTS):
        raise PruneError(
            f"{model_dir}: weights are pickled (pytorch_model.bin), which this tool does not "
            f"load; re-save the model with save_pretrained(dir, safe_serialization=True)"
        )
    raise PruneError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise PruneError(f"--out {out}: exists and is not empty; pass --overwrite")


def write_pruned_dir(
    model_dir: str | os.PathLike,
    kept: Sequence[int],
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    provenance: dict | None = None,
) -> Path:
    """Copy an HF LLaMA directory keeping only decoder layers ``kept`` (renumbered in order).

    Tensors are read and written with safetensors (no pickle); a tied ``lm_head`` stays absent
    and tied. Everything that is not a weight file or ``config.json`` (tokenizer, generation
    config, ...) is copied. The result is written to a temporary sibling and renamed into place.

    Args:
        model_dir: source HF directory (config.json + safetensors).
        kept: source layer indices to keep, in the new order.
        out_dir: directory to create.
        overwrite: replace ``out_dir`` if it exists.
        provenance: written as ``pruning.json`` beside the weights (config.json gets no extra
            keys: converters refuse keys they do not know, as they might change the model).

    Raises:
        PruneError: missing files, an index out of range, or ``out_dir`` exists without
            ``overwrite``.
    """
    from safetensors.torch import load_file, save_file

    src, out = Path(model_dir), Path(out_dir)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise PruneError(f"--model {src}: no config.json (expected a Hugging Face model dir)")
    _check_out(out, overwrite)
    config = json.loads(config_path.read_text())
    num_layers = config.get("num_hidden_layers")
    if not isinstance(num_layers, int):
        raise PruneError(f"{config_path}: no integer num_hidden_layers")
    kept = list(kept)
    if not kept or len(set(kept)) != len(kept) or not all(0 <= i < num_layers for i in kept):
        raise PruneError(f"layers to keep {kept}: need distinct indices in [0, {num_layers})")
    new_index = {old: new for new, old in enumerate(kept)}

    tensors: dict[str, torch.Tensor] = {}
    for file in _weight_files(src):
        for name, tensor in load_file(file).items():
            m = _LAYER_KEY.match(name)
            if m is None:
                tensors[name] = tensor
            elif int(m.group(2)) in new_index:
                tensors[f"{m.group(1)}{new_index[int(m.group(2))]}{m.group(3)}"] = tensor
    config["num_hidden_layers"] = len(kept)
    for key in ("layer_types", "mlp_bias_per_layer"):  # per-layer lists some configs carry
        if isinstance(config.get(key), list) and len(config[key]) == num_layers:
            config[key] = [config[key][i] for i in kept]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for item in src.iterdir():
            if item.name in ("config.json", "pruning.json") or _WEIGHT_FILES.match(item.name):
                continue
            if item.is_file():
                shutil.copy2(item, tmp / item.name)
        # Shared storage (tied tensors) would make save_file refuse; tied heads are absent anyway.
        save_file(
            {k: v.contiguous().clone() for k, v in tensors.items()},
            tmp / "model.safetensors",
            metadata={"format": "pt"},
        )
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if provenance is not None:
            (tmp / "pruning.json").write_text(json.dumps(provenance, indent=2) + "\n")
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def prune_hf_llama(
    model_dir: str | os.PathLike,
    data: str | os.PathLike,
    keep_compute: float,
    out_dir: str | os.PathLike,
    seq_length: int = 512,
    num_sequences: int = 8,
    batch_size: int = 1,
    json_key: str = "text",
    overwrite: bool = False,
    progress=None,
) -> PrunePlan:
    """Score the layers of an HF LLaMA model on ``data`` and write the pruned copy.

    Args:
        model_dir: HF LLaMA directory with its tokenizer.
        data: held-out JSONL/text file the scores are computed on.
        keep_compute: fraction of layers to keep, in (0, 1].
        out_dir: pruned HF directory to create.
        seq_length, num_sequences, batch_size: scoring windows.
        json_key: JSONL text field.
        overwrite: replace ``out_dir``.
        progress: optional iterator wrapper (tqdm).

    Returns:
        The plan (scores, kept and removed layers, c_eff); also stored in ``out_dir/pruning.json``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not 0.0 < keep_compute <= 1.0:
        raise PruneError(f"--keep-compute must be in (0, 1], got {keep_compute}")
    src = Path(model_dir)
    if not (src / "config.json").is_file():
        raise PruneError(f"--model {src}: no config.json (expected a Hugging Face model dir)")
    out = Path(out_dir)
    _check_out(out, overwrite)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise PruneError(f"--model {src}: no usable tokenizer there ({e})") from None
    windows = load_text_windows(data, tokenizer, seq_length, num_sequences, json_key)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    scores = block_influence(model, windows, batch_size, progress)
    kept, removed = choose_layers(scores, keep_compute)
    plan = PrunePlan(
        num_layers=len(scores),
        scores=scores,
        removed=removed,
        kept=kept,
        keep_compute=keep_compute,
        c_eff=len(kept) / len(scores),
        scored_tokens=windows.numel(),
    )
    provenance = {"source": str(src), "data": str(data), **plan.to_dict()}
    write_pruned_dir(src, kept, out, overwrite=overwrite, provenance=provenance)
    return plan
