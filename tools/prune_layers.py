#!/usr/bin/env python
"""ShortGPT-style baseline: remove the least important whole layers of an HF LLaMA model.

Each decoder layer's block-influence score (1 - mean cosine similarity between its input and
output hidden states on held-out text) is computed; the lowest-scoring layers are removed so
that about ``--keep-compute`` of the layers remain, and an ordinary HF LLaMA directory is written
(layers renumbered, tied embeddings kept tied, tokenizer copied), atomically.

Example::

    python tools/prune_layers.py --model smollm2-hf --data heldout.jsonl --keep-compute 0.75 \\
        --out smollm2-pruned
"""

from __future__ import annotations

import argparse
import json
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="HF LLaMA directory (safetensors + tokenizer)")
    p.add_argument("--data", required=True, help="held-out JSONL ({'text': ...}) or text file")
    p.add_argument("--json-key", default="text", help="text field of JSONL records")
    p.add_argument(
        "--keep-compute", type=float, required=True, help="fraction of layers to keep, in (0, 1]"
    )
    p.add_argument("--out", required=True, help="pruned HF directory to create")
    p.add_argument("--seq-length", type=int, default=512, help="tokens per scoring window")
    p.add_argument("--num-sequences", type=int, default=8, help="scoring windows")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--plan-json", default=None, help="also write scores and choice here (JSON)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    if args.seq_length < 2 or args.num_sequences < 1 or args.batch_size < 1:
        p.error("--seq-length must be >= 2, --num-sequences and --batch-size >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from tqdm import tqdm

    from megatron_mod.atomic import write_text_atomic
    from megatron_mod.errors import USER_ERRORS, report
    from megatron_mod.hf.prune import prune_hf_llama

    if args.threads:
        torch.set_num_threads(args.threads)

    def progress(it):
        return tqdm(it, desc="block influence", unit="batch", disable=not sys.stderr.isatty())

    try:
        plan = prune_hf_llama(
            args.model,
            args.data,
            args.keep_compute,
            args.out,
            seq_length=args.seq_length,
            num_sequences=args.num_sequences,
            batch_size=args.batch_size,
            json_key=args.json_key,
            overwrite=args.overwrite,
            progress=progress,
        )
    except USER_ERRORS as err:
        return report(err)
    if args.plan_json:
        write_text_atomic(args.plan_json, json.dumps(plan.to_dict(), indent=2) + "\n")
    ranked = sorted(range(plan.num_layers), key=lambda i: plan.scores[i])
    print("block influence (lowest first): " + ", ".join(
        f"{i}:{plan.scores[i]:.4f}" for i in ranked))  # fmt: skip
    print(
        f"removed layers {plan.removed} of {plan.num_layers}; kept {len(plan.kept)} "
        f"(requested {args.keep_compute:g}, c_eff {plan.c_eff:.4f}); scored on "
        f"{plan.scored_tokens} tokens -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
