"""CPU quick-start: build a tiny LLaMA-shaped MoD model and train it on real text.

The text is Python's own standard-library source (it ships with every Python install), tokenised
as raw bytes, so the demo needs no download, tokenizer or dataset. It prints the LM loss, the
load-reducing loss, each routed layer's kept fraction and c_eff as training goes.
"""

from __future__ import annotations

import argparse
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch

BYTE_VOCAB = 256


def stdlib_text_bytes(max_bytes: int) -> torch.Tensor:
    """Concatenated bytes of the Python standard library's source files (sorted, deterministic).

    Raises:
        FileNotFoundError: if the standard library sources cannot be found.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no Python sources under {root}; pass --text-file instead")
    chunks, total = [], 0
    for path in files:
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long()


def byte_batches(
    data: torch.Tensor, micro_batch_size: int, seq_length: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless random windows of ``seq_length + 1`` bytes -> {"tokens", "labels"}."""
    gen = torch.Generator().manual_seed(seed)
    limit = data.numel() - seq_length - 1
    if limit <= 0:
        raise ValueError(f"text has {data.numel()} bytes; need more than seq_length + 1")
    while True:
        starts = torch.randint(0, limit, (micro_batch_size,), generator=gen)
        windows = torch.stack([data[s : s + seq_length + 1] for s in starts.tolist()])
        yield {"tokens": windows[:, :-1].contiguous(), "labels": windows[:, 1:].contiguous()}


def main(argv: list[str] | None = None) -> None:
    from megatron_mod import platform
    from megatron_mod.config import MoDConfig
    from megatron_mod.models import build_gpt_model, llama_config
    from megatron_mod.training.loop import TrainConfig, format_kept_per_layer, train

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--num-layers", type=int, default=6)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--train-iters", type=int, default=40)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--text-file", help="train on this file's bytes instead of the stdlib")
    parser.add_argument("--text-bytes", type=int, default=2_000_000)
    parser.add_argument("--tensorboard-dir", default=None)
    MoDConfig.add_cli_args(parser)
    args = parser.parse_args(argv)

    mod_config = MoDConfig.from_cli_args(args)
    platform.initialize(tp=1, pp=1, seed=args.seed)
    config = llama_config(
        args.preset,
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=int(args.hidden_size * 8 / 3) // 16 * 16,
    )
    model = build_gpt_model(config, mod_config, vocab_size=BYTE_VOCAB, max_seq_len=args.seq_length)
    n_params = sum(p.numel() for p in model.parameters())
    routed = mod_config.routed_layer_indices(config.num_layers)
    if args.text_file:
        data = torch.tensor(list(Path(args.text_file).read_bytes()[: args.text_bytes]))
        source = args.text_file
    else:
        data = stdlib_text_bytes(args.text_bytes)
        source = "Python standard library sources"
    print(
        f"model: {config.num_layers} layers, hidden {config.hidden_size}, "
        f"{config.num_attention_heads} heads / {config.num_query_groups} KV groups, "
        f"{n_params / 1e6:.2f}M parameters; routed layers {routed}\n"
        f"MoD: {mod_config.to_dict()}\n"
        f"data: {data.numel() / 1e6:.1f} MB of {source}, byte-level tokens",
        flush=True,
    )
    cfg = TrainConfig(
        train_iters=args.train_iters,
        micro_batch_size=args.micro_batch_size,
        seq_length=args.seq_length,
        lr=args.lr,
        min_lr=args.lr / 10,
        log_interval=5,
        tensorboard_dir=args.tensorboard_dir,
    )
    results = train(
        model,
        byte_batches(data, cfg.micro_batch_size, cfg.seq_length, args.seed),
        cfg,
        config.num_layers,
    )
    first, last = results[0], results[-1]
    kept = format_kept_per_layer(last.kept_fraction)
    print(
        f"\nsummary: {len(results)} steps | lm loss {first.lm_loss:.3f} -> {last.lm_loss:.3f} | "
        f"load loss {last.load_loss:.5f} | c_eff {last.c_eff:.3f}\n"
        f"kept fraction per routed layer: {kept}",
        flush=True,
    )
    platform.destroy()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    main()
