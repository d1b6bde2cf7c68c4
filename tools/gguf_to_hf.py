#!/usr/bin/env python
"""Dequantize a LLaMA-family GGUF file (llama.cpp) into a Hugging Face model directory.

Example::

    python tools/gguf_to_hf.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out-dir smollm2-hf
    python tools/convert_hf_to_megatron.py --hf-dir smollm2-hf --out-dir ckpt/smollm2-mod
    # or in one step: --hf-dir SmolLM2-135M-Instruct.Q4_1.gguf

Uses transformers' GGUF loader (needs the ``gguf`` and ``accelerate`` packages); writes
safetensors, config.json and the tokenizer rebuilt from the file. See docs/checkpoints.md.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--gguf", required=True, help="the .gguf file")
    p.add_argument("--out-dir", required=True, help="HF model dir to create")
    p.add_argument(
        "--dtype",
        default="fp32",
        choices=["fp32", "bf16", "fp16"],
        help="dtype of the dequantized weights (fp32 holds them exactly)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out-dir")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_mod.errors import USER_ERRORS, report
    from megatron_mod.hf.gguf import gguf_to_hf

    try:
        config = gguf_to_hf(args.gguf, args.out_dir, dtype=args.dtype, overwrite=args.overwrite)
    except USER_ERRORS as err:
        return report(err)
    print(
        f"{args.gguf} -> {args.out_dir}: {config.get('architectures')}, "
        f"{config.get('num_hidden_layers')} layers, hidden {config.get('hidden_size')}, "
        f"vocab {config.get('vocab_size')}, tied embeddings {config.get('tie_word_embeddings')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
