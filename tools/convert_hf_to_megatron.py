#!/usr/bin/env python
"""Convert a Hugging Face LLaMA checkpoint into a megatron-mod (torch_dist) checkpoint.

Example::

    python tools/convert_hf_to_megatron.py --hf-dir Llama-2-7b-hf --out-dir ckpt/llama2-7b-mod \\
        --tp 2 --pp 2 --mod-routed-layers every_other --mod-threshold 0.5

The checkpoint loads under any TP/PP; ``--tp``/``--pp`` choose the vocabulary padding, are
validated against the model and recorded as the training default. Families: LLaMA-2, LLaMA-3.x
(llama3 RoPE scaling, tied embeddings), Mistral without sliding window, Qwen2/2.5 (q/k/v biases),
and megatron-mod's own ``llama_mod`` exports, whose MoD settings are kept unless a ``--mod-*``
flag is given. ``--hf-dir`` may be a GGUF file. See docs/checkpoints.md.
"""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    from megatron_mod.config import MoDConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--hf-dir",
        required=True,
        help="HF model dir (config.json + weights), or a .gguf file (LLaMA-family GGUF)",
    )
    p.add_argument("--out-dir", required=True, help="megatron-mod checkpoint dir to create")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to prepare for")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to prepare for")
    p.add_argument("--dense", action="store_true", help="no routers: a plain dense checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out-dir")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="stored dtype (auto: the source's); routers are always fp32",
    )
    p.add_argument("--max-seq-len", type=int, default=None, help="default: max_position_embeddings")
    p.add_argument("--seed", type=int, default=1234, help="seed of the router initialisation")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    MoDConfig.add_cli_args(p)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return _parser().parse_args(argv)


def explicit_mod_fields(argv=None) -> set[str]:
    """``MoDConfig`` fields whose ``--mod-*`` flag is on the command line (not defaulted)."""
    p = _parser()
    for action in p._actions:
        if action.dest.startswith("mod_"):
            action.default = argparse.SUPPRESS
    given, _ = p.parse_known_args(argv)
    return {name.removeprefix("mod_") for name in vars(given) if name.startswith("mod_")}


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_mod.config import MoDConfig
    from megatron_mod.errors import USER_ERRORS, report
    from megatron_mod.hf.convert import convert_hf_to_megatron

    try:
        mod_config = None if args.dense else MoDConfig.from_cli_args(args)
        summary = convert_hf_to_megatron(
            args.hf_dir,
            args.out_dir,
            tp=args.tp,
            pp=args.pp,
            mod_config=mod_config,
            dtype=args.dtype,
            overwrite=args.overwrite,
            max_seq_len=args.max_seq_len,
            seed=args.seed,
            progress=not args.no_progress,
            # A megatron-mod export keeps its own MoD settings except those given as flags.
            explicit_mod_fields=explicit_mod_fields(argv),
        )
    except USER_ERRORS as err:  # ConversionError, a missing file, a bad MoDConfig flag
        return report(err)
    print(summary.format())
    return 0


if __name__ == "__main__":  # dist_checkpointing may spawn helpers: keep the guard
    sys.exit(main())
