"""Save and load time and size of a training checkpoint (model + optimizer) of a >= 1 GB model.

What is measured (one process; on a GPU host the model and optimizer live on the GPU):

* a LLaMA-shaped MoD ``GPTModel`` (default ~300M parameters, 1.2 GB in fp32, every other layer
  routed) is wrapped in megatron-core DDP with the Megatron optimizer (Adam, optionally the
  distributed optimizer) exactly as ``tools/pretrain_mod.py`` does, and trained for one step on
  random tokens so that the Adam moments exist;
* ``save`` = :func:`megatron_mod.training.checkpoint.save_training_checkpoint` (model, optimizer,
  scheduler, RNG, train state; written to a temporary directory, fsynced, renamed, ``latest``
  moved), ``--repeats`` times, each to a new iteration;
* ``load`` = :func:`~megatron_mod.training.checkpoint.load_training_checkpoint` into the same
  model and optimizer, then a check that the weights and Adam moments came back bit for bit;
* ``bytes`` = size of one iteration directory on disk; ``GB/s`` = bytes / time.

The state is ~4x the model's fp32 size (weights, two Adam moments; a bf16 model adds fp32 main
weights). Results are printed and written to
``benchmarks/results/bench_checkpoint_<device>.json``.

Examples::

    python benchmarks/bench_checkpoint.py                        # CPU, ~1.2 GB model
    python benchmarks/bench_checkpoint.py --device cuda --bf16   # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.host import device_info, device_tag  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--bf16", action="store_true", help="bf16 weights (fp32 main weights)")
    p.add_argument("--distributed-optimizer", action="store_true")
    p.add_argument("--repeats", type=int, default=2, help="saves (and loads) to time")
    p.add_argument("--dir", help="where to write the checkpoints (default: a temp dir)")
    p.add_argument("--json-out", help="default: benchmarks/results/bench_checkpoint_<device>.json")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is available")
    if args.device == "cpu" and torch.cuda.is_available():
        p.error("this host has CUDA: run with --device cuda (the platform uses the GPU)")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv=None) -> dict:
    args = parse_args(argv)
    from megatron_mod import platform
    from megatron_mod.checkpointing import CheckpointMetadata
    from megatron_mod.config import MoDConfig
    from megatron_mod.models import build_gpt_model, llama_config
    from megatron_mod.training import checkpoint as ckpt
    from megatron_mod.training.loop import TrainConfig, train
    from megatron_mod.training.optimizer import setup_model_and_optimizer

    platform.initialize(tp=1, pp=1, seed=1234)
    shape = dict(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        num_query_groups=args.kv_heads,
        ffn_hidden_size=args.ffn,
    )
    config = llama_config("tiny", **shape, **({"bf16": True} if args.bf16 else {}))
    mod = MoDConfig()
    model = build_gpt_model(config, mod, args.vocab, 128)
    params = sum(p.numel() for p in model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"model: {params / 1e6:.0f}M parameters, {model_bytes / 1e9:.2f} GB", flush=True)
    cfg = TrainConfig(
        train_iters=1,
        micro_batch_size=1,
        seq_length=64,
        lr=1e-4,
        min_lr=1e-5,
        lr_warmup_iters=0,
        use_distributed_optimizer=args.distributed_optimizer,
    )
    training = setup_model_and_optimizer(model, cfg)
    ddp_model, optimizer, scheduler = training

    def batches():
        gen = torch.Generator().manual_seed(0)
        while True:
            tokens = torch.randint(0, args.vocab, (1, 65), generator=gen)
            yield {"tokens": tokens[:, :-1], "labels": tokens[:, 1:]}

    t0 = time.perf_counter()
    train(model, batches(), cfg, args.layers, training=training)
    print(f"one training step (Adam state allocated): {time.perf_counter() - t0:.1f} s", flush=True)
    metadata = CheckpointMetadata(
        preset="custom",
        model_overrides=shape,
        mod=mod.to_dict(),
        vocab_size=args.vocab,
        padded_vocab_size=args.vocab,
        max_seq_len=128,
        params_dtype="bfloat16" if args.bf16 else "float32",
    )
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench_checkpoint_"))
    saves, loads, sizes = [], [], []
    try:
        for i in range(1, args.repeats + 1):
            state = ckpt.TrainState(
                iteration=i, consumed_samples=i, scheduler={}, args={}, layout={}
            )
            t0 = time.perf_counter()
            iter_dir = ckpt.save_training_checkpoint(
                root, model, optimizer, scheduler, metadata, state
            )
            saves.append(time.perf_counter() - t0)
            sizes.append(_dir_bytes(iter_dir))
            print(f"save {i}: {saves[-1]:.2f} s, {sizes[-1] / 1e9:.2f} GB", flush=True)
        expected = [p.detach().clone() for p in model.parameters()]
        inner = optimizer.chained_optimizers[0].optimizer
        moments = [s["exp_avg"].clone() for s in inner.state.values()]
        for i in range(1, args.repeats + 1):
            with torch.no_grad():
                for p in model.parameters():
                    p.zero_()
                for s in inner.state.values():
                    s["exp_avg"].zero_()
            t0 = time.perf_counter()
            ckpt.load_training_checkpoint(root / f"iter_{i:07d}", model, optimizer, scheduler)
            loads.append(time.perf_counter() - t0)
            print(f"load {i}: {loads[-1]:.2f} s", flush=True)
        exact = all(torch.equal(a, b) for a, b in zip(expected, model.parameters())) and all(
            torch.equal(a, s["exp_avg"]) for a, s in zip(moments, inner.state.values())
        )
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    info = device_info(args.device)
    size = statistics.median(sizes)
    result = {
        "device": info,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "model": {
            **shape,
            "vocab": args.vocab,
            "params": params,
            "model_bytes": model_bytes,
            "dtype": "bfloat16" if args.bf16 else "float32",
            "routed_layers": mod.routed_layers,
        },
        "distributed_optimizer": args.distributed_optimizer,
        "checkpoint_bytes": size,
        "save_s": [round(t, 3) for t in saves],
        "load_s": [round(t, 3) for t in loads],
        "save_s_median": round(statistics.median(saves), 3),
        "load_s_median": round(statistics.median(loads), 3),
        "save_gb_per_s": round(size / 1e9 / statistics.median(saves), 3),
        "load_gb_per_s": round(size / 1e9 / statistics.median(loads), 3),
        "load_restores_exactly": exact,
    }
    print(
        f"\n| model | checkpoint | save s | load s | save GB/s | load GB/s | exact |\n"
        f"|---|---|---|---|---|---|---|\n"
        f"| {params / 1e6:.0f}M ({model_bytes / 1e9:.2f} GB) | {size / 1e9:.2f} GB | "
        f"{result['save_s_median']} | {result['load_s_median']} | {result['save_gb_per_s']} | "
        f"{result['load_gb_per_s']} | {exact} |",
        flush=True,
    )
    out = Path(args.json_out or RESULTS_DIR / f"bench_checkpoint_{device_tag(info)}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    platform.destroy()
    if not exact:
        raise SystemExit("loaded state differs from the saved one")
    return result


if __name__ == "__main__":  # dist_checkpointing spawns helpers: keep the guard
    main()
