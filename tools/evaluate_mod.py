#!/usr/bin/env python
"""Evaluate a megatron-mod checkpoint on held-out data: loss, perplexity, kept fractions, c_eff.

Example::

    python tools/evaluate_mod.py --load ckpt/base-mod-trained \
        --data-path 0.7 data/wiki_text_document 0.3 data/books_text_document \
        --seq-length 1024 --eval-iters 50 --mod-threshold 0.6 --json-out eval_p0.6.json

No optimizer is built. The same command runs under ``torchrun`` with
``--tensor-model-parallel-size`` / ``--pipeline-model-parallel-size`` (the checkpoint loads under
any layout); ``--help`` lists every flag (see megatron_mod/training/evaluation.py).
"""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    from megatron_mod.errors import USER_ERRORS, report
    from megatron_mod.training.evaluation import evaluate_checkpoint, parse_args

    args = parse_args(argv)
    try:
        evaluate_checkpoint(args)
    except USER_ERRORS as err:
        return report(err)
    return 0


if __name__ == "__main__":  # dist_checkpointing may spawn helpers: keep the guard
    sys.exit(main())
