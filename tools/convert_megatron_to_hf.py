#!/usr/bin/env python
"""Export a megatron-mod checkpoint (written with any TP/PP) to a Hugging Face model directory.

Example::

    python tools/convert_megatron_to_hf.py --ckpt-dir ckpt/llama2-7b-mod --out-dir llama2-7b-mod-hf
    # then: AutoModelForCausalLM.from_pretrained("llama2-7b-mod-hf", trust_remote_code=True)

``--dense`` exports a stock ``LlamaForCausalLM`` (no routers). See docs/checkpoints.md.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--ckpt-dir",
        "--load",
        dest="ckpt_dir",
        required=True,
        help="megatron-mod checkpoint dir (--load: Megatron-LM's name for it)",
    )
    p.add_argument("--out-dir", required=True, help="HF model dir to create")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["bf16", "fp16", "fp32"],
        help="dtype of the exported weights (default: the checkpoint's); routers stay fp32",
    )
    p.add_argument("--dense", action="store_true", help="export a plain LlamaForCausalLM")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out-dir")
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (e.g. 5GB)")
    p.add_argument("--iteration", type=int, default=None, help="default: the 'latest' iteration")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_mod.errors import USER_ERRORS, report
    from megatron_mod.hf.convert import convert_megatron_to_hf

    try:
        summary = convert_megatron_to_hf(
            args.ckpt_dir,
            args.out_dir,
            dtype=args.dtype,
            dense=args.dense,
            overwrite=args.overwrite,
            max_shard_size=args.max_shard_size,
            iteration=args.iteration,
            progress=not args.no_progress,
        )
    except USER_ERRORS as err:
        return report(err)
    print(summary.format())
    return 0


if __name__ == "__main__":  # dist_checkpointing may spawn helpers: keep the guard
    sys.exit(main())
