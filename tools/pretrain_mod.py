#!/usr/bin/env python
"""Continued pretraining (MoDification) of a converted megatron-mod checkpoint.

Example::

    python tools/pretrain_mod.py --load ckpt/base-mod --save ckpt/base-mod-trained \
        --data-path 0.7 data/wiki_text_document 0.3 data/books_text_document \
        --seq-length 1024 --micro-batch-size 4 --train-iters 1000 --lr 3e-5 \
        --mod-load-loss-coeff 0.01 --tensorboard-dir runs/mod

Add ``--save-interval 500`` to write a training checkpoint every 500 steps; re-running the same
command continues from the newest one (``--exit-signal-handler``: SIGTERM saves and exits 0).

The same command runs under ``torchrun`` for tensor, sequence, pipeline and data parallelism
(``--tensor-model-parallel-size``, ``--sequence-parallel``, ``--pipeline-model-parallel-size``,
``--use-distributed-optimizer``, ``--bf16``); ``--help`` lists every flag (see
megatron_mod/training/pretrain.py).
"""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    from megatron_mod.errors import USER_ERRORS, report
    from megatron_mod.training.arguments import parse_args
    from megatron_mod.training.loop import NonFiniteError
    from megatron_mod.training.pretrain import pretrain

    args = parse_args(argv)
    try:
        pretrain(args)
    except USER_ERRORS as err:
        return report(err)
    except NonFiniteError as err:  # not the user's input: its own exit code, for schedulers
        report(err)
        return 3
    return 0


if __name__ == "__main__":  # dist_checkpointing may spawn helpers: keep the guard
    sys.exit(main())
