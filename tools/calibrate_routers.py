#!/usr/bin/env python
"""Calibrate MoD routers on a pretrained HF LLaMA model and write a megatron-mod checkpoint.

With the base model frozen, on a few thousand tokens of text: score every layer (block
influence, loss increase when skipped), fit a router per candidate layer to each token's
relative update in that layer, choose the routed layers and their kept fractions for
``--target-compute``, and set the routers' thresholds so the checkpoint starts at
``--start-compute``. Continue training it with ``tools/pretrain_mod.py --mod-target-compute X``:
the compute target anneals each layer from its start to its calibrated budget.

Example::

    python tools/calibrate_routers.py --model smollm2-hf --data corpus/train.jsonl \\
        --target-compute 0.85 --out-dir ckpt/smollm2-mod --report-json calibration.json
    python tools/pretrain_mod.py --load ckpt/smollm2-mod --mod-target-compute 0.85 ...

See docs/design.md ("Router calibration").
"""

from __future__ import annotations

import argparse
import json
import sys


def parse_args(argv=None) -> argparse.Namespace:
    from megatron_mod.config import MoDConfig

    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Example:\n" + __doc__.split("Example::\n")[1].split("\n\nSee")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="HF LLaMA-family directory (with tokenizer)")
    p.add_argument("--data", required=True, help="calibration JSONL ({'text': ...}) or text file")
    p.add_argument("--json-key", default="text", help="text field of JSONL records")
    p.add_argument("--out-dir", required=True, help="megatron-mod checkpoint to create")
    p.add_argument(
        "--target-compute",
        type=float,
        required=True,
        help="c_eff the per-layer budgets add up to, in (0, 1]",
    )
    p.add_argument(
        "--start-compute",
        type=float,
        default=1.0,
        help="c_eff the checkpoint routes at before training (default: 1.0, every "
        "token kept; the trainer's compute target anneals to the budgets)",
    )
    p.add_argument(
        "--max-skip",
        type=float,
        default=0.75,
        help="largest fraction one routed layer may skip (default: 0.75)",
    )
    p.add_argument(
        "--min-skip",
        type=float,
        default=0.05,
        help="layers whose share would be smaller stay dense (default: 0.05)",
    )
    p.add_argument(
        "--probe-skip",
        type=float,
        default=0.5,
        help="fraction skipped when a layer's loss cost is probed (default: 0.5)",
    )
    p.add_argument(
        "--allocation",
        choices=("concentrated", "spread"),
        default="concentrated",
        help="concentrated: skip --max-skip of the tokens in the cheapest layers first "
        "(measured better on SmolLM2); spread: share the skipping out as 1 / cost "
        "(default: concentrated)",
    )
    p.add_argument(
        "--never-route",
        default="0,-1",
        help="comma list of layers never routed; negative counts from the end "
        "(default: 0,-1, the first and last layer; '' for none)",
    )
    p.add_argument("--seq-length", type=int, default=512, help="tokens per window (default: 512)")
    p.add_argument(
        "--num-sequences",
        type=int,
        default=8,
        help="calibration windows, a quarter held out (default: 8)",
    )
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward (default: 1)")
    p.add_argument("--tp", type=int, default=1, help="TP size the checkpoint is prepared for")
    p.add_argument("--pp", type=int, default=1, help="PP size the checkpoint is prepared for")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="measurement and stored dtype (auto: fp32 measurement, source dtype " "stored)",
    )
    p.add_argument("--device", default="cpu", help="measurement device (cpu, cuda, cuda:1)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--report-json", default=None, help="also write the plan here (JSON)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out-dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    MoDConfig.add_cli_args(
        p,
        fields=[
            "threshold",
            "gate",
            "router_input",
            "keep_first_token",
            "load_loss_coeff",
            "skipped_kv",
        ],  # fmt: skip
        with_defaults=False,
        title="routing of the written checkpoint (defaults: MoDConfig's, " "gate straight_through)",
    )
    args = p.parse_args(argv)
    if args.seq_length < 2 or args.num_sequences < 2 or args.batch_size < 1:
        p.error("--seq-length and --num-sequences must be >= 2, --batch-size >= 1")
    try:
        args.never_route = tuple(int(x) for x in args.never_route.split(",") if x.strip())
    except ValueError:
        p.error(f"--never-route {args.never_route!r}: expected a comma list of integers")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from megatron_mod.atomic import write_text_atomic
    from megatron_mod.config import MoDConfig
    from megatron_mod.errors import USER_ERRORS, report
    from megatron_mod.hf.calibrate import CalibrationSettings, calibrate_hf_llama

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        settings = CalibrationSettings(
            target_compute=args.target_compute,
            start_compute=args.start_compute,
            max_skip=args.max_skip,
            min_skip=args.min_skip,
            probe_skip=args.probe_skip,
            allocation=args.allocation,
            never_route=args.never_route,
        )
        mod = MoDConfig.from_cli_args(args, base=MoDConfig(gate="straight_through"))
        plan = calibrate_hf_llama(
            args.model,
            args.data,
            args.out_dir,
            settings,
            mod,
            seq_length=args.seq_length,
            num_sequences=args.num_sequences,
            batch_size=args.batch_size,
            json_key=args.json_key,
            tp=args.tp,
            pp=args.pp,
            dtype=args.dtype,
            device=args.device,
            overwrite=args.overwrite,
            progress=not args.no_progress and sys.stderr.isatty(),
        )
    except USER_ERRORS as err:
        return report(err)
    if args.report_json:
        write_text_atomic(args.report_json, json.dumps(plan.to_dict(), indent=2) + "\n")
    losses = plan.losses
    print(
        f"routed layers {plan.routed_layers} of {plan.num_layers}; kept at the target: "
        + ", ".join(f"{j}:{plan.layer_kept_targets[j]:.2f}" for j in plan.routed_layers)
    )
    print(
        "router correlation (held out): "
        + ", ".join(f"{j}:{plan.router_correlation[j]:.2f}" for j in plan.routed_layers)
    )
    print(
        f"held-out loss: base {losses['base']:.4f}; at c_eff {plan.c_eff_measured:.3f}: "
        f"calibrated routers {losses['plan']:.4f}, first token routable "
        f"{losses['plan_first_token_routable']:.4f}, random routing "
        f"{losses['random_routing']:.4f}, "
        f"layer removal {losses['layer_removal']:.4f} (layers {plan.layer_removal}); "
        f"checkpoint starts at c_eff {plan.start_compute:g} (loss {losses['start']:.4f})"
    )
    print(f"wrote {args.out_dir} in {plan.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
