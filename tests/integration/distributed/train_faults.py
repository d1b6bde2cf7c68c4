"""Run ``tools/pretrain_mod.py`` with one fault injected at a chosen training iteration.

Usage (plain python or torchrun)::

    train_faults.py --fault {sigterm,kill-mid-save,nan} --fault-iter N [--fault-rank R] -- ARGS

* ``sigterm``: the process sends itself SIGTERM during iteration N's forward pass (what SLURM
  does before a job's time limit), as a real signal;
* ``kill-mid-save``: SIGKILL right after iteration N's checkpoint files are written into the
  temporary directory, before it is renamed and ``latest`` moves;
* ``nan``: iteration N's LM loss on rank R (default 0) is multiplied by NaN, so the loss and
  every gradient of that rank are NaN.

The real trainer runs otherwise unchanged; the wrapper only counts training steps (megatron_mod
sets the load-loss scale once at the start of each) and wraps the forward step.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fault", required=True, choices=("sigterm", "kill-mid-save", "nan"))
    parser.add_argument("--fault-iter", type=int, required=True)
    parser.add_argument("--fault-rank", type=int, default=0)
    args, rest = parser.parse_known_args()
    if rest and rest[0] == "--":
        rest = rest[1:]

    import torch
    from megatron.core import dist_checkpointing

    from megatron_mod.training import loop

    step = {"n": 0}
    original_scale = loop.set_load_loss_scale

    def counting_scale(num_microbatches):
        step["n"] += 1
        return original_scale(num_microbatches)

    loop.set_load_loss_scale = counting_scale
    original_make = loop.make_forward_step

    def make_forward_step(micro_batch_size, seq_length):
        forward_step = original_make(micro_batch_size, seq_length)

        def faulty(data_iterator, model):
            output, loss_func = forward_step(data_iterator, model)
            if model.training and step["n"] == args.fault_iter:
                if args.fault == "sigterm":
                    os.kill(os.getpid(), signal.SIGTERM)
                elif args.fault == "nan" and torch.distributed.get_rank() == args.fault_rank:
                    output = output * float("nan")
            return output, loss_func

        return faulty

    loop.make_forward_step = make_forward_step
    original_save = dist_checkpointing.save

    def save(state, checkpoint_dir, *a, **k):
        result = original_save(state, checkpoint_dir, *a, **k)
        if args.fault == "kill-mid-save" and Path(checkpoint_dir).name == (
            f".tmp_iter_{args.fault_iter:07d}"
        ):
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    dist_checkpointing.save = save

    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))
    import pretrain_mod

    return pretrain_mod.main(rest)


if __name__ == "__main__":  # dist_checkpointing may spawn helpers: keep the guard
    sys.exit(main())
