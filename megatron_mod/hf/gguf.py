"""GGUF (llama.cpp) file -> Hugging Face model directory, through transformers' own GGUF loader.

transformers reads a LLaMA-family GGUF file (``AutoModelForCausalLM.from_pretrained(dir,
gguf_file=name)``), dequantizes every tensor (Q4/Q8/F16 ... -> the requested float dtype), undoes
llama.cpp's q/k row permutation and rebuilds the tokenizer from the file's vocabulary. This module
saves that as an ordinary HF directory (safetensors, ``config.json``, tokenizer files,
``generation_config.json``), which :func:`megatron_mod.hf.convert.convert_hf_to_megatron` then
imports; that function also accepts the ``.gguf`` file directly and calls this first.

Needs the ``gguf`` and ``accelerate`` packages (``requirements-dev.txt``). The whole dequantized
model is held in memory once (GGUF files are typically small, quantized models), and the output
directory is written under a temp name and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

__all__ = ["gguf_to_hf"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def gguf_to_hf(
    gguf_file: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Dequantize a GGUF file into a HF model directory with its tokenizer.

    Args:
        gguf_file: path of the ``.gguf`` file.
        out_dir: HF directory to create.
        dtype: ``fp32`` (default: dequantized values are exact in fp32), ``bf16`` or ``fp16``.
        overwrite: replace a non-empty ``out_dir``.

    Returns:
        The saved ``config.json`` as a dict.

    Raises:
        ConversionError: missing file or packages, a non-empty ``out_dir``, or a GGUF
            architecture transformers cannot load.
    """
    from megatron_mod.hf.io import ConversionError, check_output_dir

    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if not gguf_file.is_file():
        raise ConversionError(f"GGUF file {gguf_file} not found")
    check_output_dir(out_dir, overwrite)
    if dtype is not None and dtype not in _DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: use one of {sorted(_DTYPES)}")
    missing = []
    for module, package in (("gguf", "gguf"), ("accelerate", "accelerate")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise ConversionError(
            f"reading {gguf_file} needs the packages {missing} (transformers' GGUF loader); "
            f"install them: pip install {' '.join(missing)}"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _DTYPES[dtype or "fp32"]
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch_dtype
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    except (ValueError, KeyError, RuntimeError) as err:
        raise ConversionError(f"{gguf_file}: transformers could not load it: {err}") from err
    out_dir = out_dir.absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        # Saved by hand: transformers 5 marks a GGUF-loaded model as quantized and refuses
        # save_pretrained, although its tensors are plain dequantized floats.
        from safetensors.torch import save_file

        tmp.mkdir()
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        if not config.get("architectures"):  # save_pretrained would add it
            config["architectures"] = [type(model).__name__]
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if config.get("tie_word_embeddings"):
            state.pop("lm_head.weight", None)  # one matrix, as transformers saves tied models
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return config
