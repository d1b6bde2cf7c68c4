#!/usr/bin/env python
"""Sweep the routing threshold p of one HF MoD model at run time: quality against compute.

For each p (``model.set_mod_threshold(p)``, no retraining) it measures, on the same held-out
tokens: the language-model loss and perplexity, ``c_eff`` (the fraction of (token, layer) pairs
computed, all layers counted, dense ones as 1) and the kept fraction of every routed layer, and
the measured prefill time and decode ms/token, each next to the same model at p = 0 (every token
computed, through the same code) timed in the same run. It prints a table, writes a JSON and a
PNG (loss against c_eff and against the measured prefill speed-up, Pareto front marked).

Data (``--data``): a JSONL / JSONL.gz / Parquet file (key ``--json-key``), a plain-text file, or
a Megatron indexed dataset prefix (``PREFIX.bin`` + ``PREFIX.idx``, already tokenized). Texts are
tokenized with the model directory's tokenizer, each document followed by its EOS token, joined
and cut into ``--seq-length`` windows (as GPTDataset does); the first ``--num-sequences`` windows
are scored.

Example::

    python tools/sweep_threshold.py --model work/smollm2-mod-hf --data heldout.jsonl \\
        --p 0.3,0.4,0.5,0.6,0.7 --seq-length 1024 --num-sequences 16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_mod.atomic import write_text_atomic  # noqa: E402
from megatron_mod.data.documents import DocumentError, read_token_stream  # noqa: E402
from megatron_mod.errors import USER_ERRORS, MegatronModError, report  # noqa: E402


class SweepError(MegatronModError, ValueError):
    """Bad input for the sweep (the message names the file or flag and what to do)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see ``--help``)."""
    p = argparse.ArgumentParser(
        description="Held-out loss, c_eff and measured speed of one HF MoD model per threshold p.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="HF llama_mod directory (an export)")
    p.add_argument(
        "--data", required=True, help="JSONL/Parquet/text file or Megatron indexed dataset prefix"
    )
    p.add_argument("--json-key", default="text", help="text key of JSONL/Parquet records")
    p.add_argument("--p", default="0.3,0.4,0.5,0.6,0.7", help="comma list of thresholds p")
    p.add_argument("--seq-length", type=int, default=1024, help="tokens per scored window")
    p.add_argument("--num-sequences", type=int, default=16, help="windows to score")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward")
    p.add_argument(
        "--speed-context", type=int, default=None, help="prompt for timing (default: seq length)"
    )
    p.add_argument("--speed-new-tokens", type=int, default=16, help="decode steps timed")
    p.add_argument("--speed-rounds", type=int, default=2, help="timing rounds (median)")
    p.add_argument("--no-speed", action="store_true", help="skip the timing")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--out-dir", default=".", help="where the JSON and PNG go")
    p.add_argument("--name", default=None, help="file stem (default: sweep_threshold_<model>)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = p.parse_args(argv)
    try:
        args.p = [float(x) for x in args.p.split(",") if x.strip()]
    except ValueError:
        p.error(f"--p: comma list of numbers expected, got {args.p!r}")
    if not args.p or any(not 0.0 <= x <= 1.0 for x in args.p):
        p.error(f"--p: thresholds in [0, 1] expected, got {args.p}")
    if min(args.seq_length, args.num_sequences, args.batch_size, args.speed_rounds) < 1:
        p.error("--seq-length, --num-sequences, --batch-size, --speed-rounds must be >= 1")
    if args.seq_length < 2:
        p.error("--seq-length must be >= 2")
    return args


# --------------------------------------------------------------------------- data


def _indexed_prefix(data: str) -> str | None:
    prefix = data[:-4] if data.endswith((".bin", ".idx")) else data
    if os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx"):
        return prefix
    return None


def load_windows(args, tokenizer, vocab_size: int) -> torch.Tensor:
    """[num_sequences, seq_length] token windows from ``--data``."""
    needed = args.num_sequences * args.seq_length
    tokens: list[int] = []
    prefix = _indexed_prefix(args.data)
    if prefix is not None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        dataset = IndexedDataset(prefix)
        for i in range(len(dataset)):
            tokens.extend(int(t) for t in dataset[i])
            if len(tokens) >= needed:
                break
    elif os.path.isfile(args.data):
        if tokenizer is None:
            raise SweepError(f"--model {args.model}: no tokenizer there to tokenize --data")
        try:
            tokens = read_token_stream(args.data, tokenizer, needed, args.json_key)
        except DocumentError as err:
            raise SweepError(f"--data {err}") from None
    else:
        raise SweepError(
            f"--data {args.data}: neither a file nor a Megatron indexed dataset prefix "
            f"({args.data}.bin/.idx)"
        )
    if len(tokens) < needed:
        n = len(tokens) // args.seq_length
        if n == 0:
            raise SweepError(
                f"--data {args.data}: {len(tokens)} tokens, fewer than one window of "
                f"--seq-length {args.seq_length}"
            )
        print(f"note: --data holds {n} windows of {args.seq_length} tokens; scoring {n}")
        needed = n * args.seq_length
    windows = torch.tensor(tokens[:needed], dtype=torch.long).view(-1, args.seq_length)
    if int(windows.max()) >= vocab_size:
        raise SweepError(
            f"--data {args.data}: token id {int(windows.max())} >= the model's vocabulary "
            f"({vocab_size}): was it tokenized with another tokenizer?"
        )
    return windows


# --------------------------------------------------------------------------- model


def load_model(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(path) / "config.json").is_file():
        raise SweepError(f"--model {path}: no config.json (expected an HF llama_mod export)")
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)
    if getattr(model.config, "model_type", None) != "llama_mod":
        raise SweepError(
            f"--model {path}: model_type {model.config.model_type!r}; the sweep needs a "
            f"llama_mod export (tools/convert_megatron_to_hf.py without --dense)"
        )
    if model.config.mod_routing != "threshold":
        raise SweepError(
            f"--model {path}: mod_routing is {model.config.mod_routing!r}; p only acts on "
            f"threshold routing"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tokenizer = None
    return model.eval(), tokenizer


def score(model, windows: torch.Tensor, batch_size: int) -> dict:
    """Token-weighted LM loss and per-layer kept fractions over all windows."""
    num_layers = model.config.num_hidden_layers
    routed = list(model.config.mod_routed_layers)
    nll, count = 0.0, 0
    kept = dict.fromkeys(routed, 0)
    tokens = 0
    with torch.inference_mode():
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start : start + batch_size]
            out = model(ids, use_cache=False, output_router_stats=True)
            logits = out.logits[:, :-1].float()
            labels = ids[:, 1:]
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                         reduction="sum"))  # fmt: skip
            count += labels.numel()
            for i in routed:
                kept[i] += out.router_stats[i]["kept_tokens"]
            tokens += ids.numel()
    kept_fraction = {i: kept[i] / tokens for i in routed}
    c_eff = (num_layers - len(routed) + sum(kept_fraction.values())) / num_layers
    loss = nll / count
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "c_eff": c_eff,
        "kept": {str(i): round(f, 4) for i, f in kept_fraction.items()},
        "scored_tokens": count,
    }


def time_once(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode ms per token) of one greedy generation with the MoD cache."""

    def now() -> float:
        # GPU work is asynchronous: wait for it before reading the clock.
        if ids.is_cuda:
            torch.cuda.synchronize(ids.device)
        return time.perf_counter()

    with torch.inference_mode():
        t0 = now()
        out = model(ids, use_cache=True, logits_to_keep=1)
        t1 = now()
        cache = out.past_key_values
        for _ in range(new_tokens):
            out = model(out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
        t2 = now()
    return t1 - t0, (t2 - t1) * 1000.0 / max(new_tokens, 1)


def measure_speed(model, ids: torch.Tensor, ps: list[float], new_tokens: int, rounds: int):
    """Per p: median prefill/decode over rounds and the median ratio to p = 0 (all computed)."""
    times: dict[float, list[tuple[float, float]]] = {p: [] for p in [0.0, *ps]}
    model.set_mod_threshold(ps[0])
    time_once(model, ids[:, : min(64, ids.shape[1])], 1)  # warm-up
    for rnd in range(rounds):
        order = [0.0, *ps] if rnd % 2 == 0 else [*ps, 0.0]  # alternate who runs first
        for p in order:
            model.set_mod_threshold(p)
            times[p].append(time_once(model, ids, new_tokens))
    base = times[0.0]
    out = {}
    for p in [0.0, *ps]:
        prefill = [t[0] for t in times[p]]
        decode = [t[1] for t in times[p]]
        out[p] = {
            "prefill_s": round(statistics.median(prefill), 4),
            "decode_ms_per_token": round(statistics.median(decode), 3),
            "prefill_speedup_vs_p0": round(
                statistics.median(b[0] / t[0] for b, t in zip(base, times[p])), 4
            ),
            "decode_speedup_vs_p0": round(
                statistics.median(b[1] / t[1] for b, t in zip(base, times[p])), 4
            ),
        }
    return out


# --------------------------------------------------------------------------- report


def pareto_front(points: list[tuple[float, float, float]]) -> set[float]:
    """The p of every point ``(p, cost, loss)`` that no other point beats (lower is better on
    both, strictly on one)."""
    front = set()
    for p, cost, loss in points:
        if not any(
            c <= cost and lo <= loss and (c < cost or lo < loss) for q, c, lo in points if q != p
        ):
            front.add(p)
    return front


def markdown_table(rows: list[dict], timed: bool) -> str:
    head = "| p | loss | perplexity | c_eff | kept per routed layer |"
    rule = "|---:|---:|---:|---:|---|"
    if timed:
        head += " prefill s | × vs p=0 | decode ms/token | × vs p=0 |"
        rule += "---:|---:|---:|---:|"
    lines = [head, rule]
    for r in rows:
        kept = " ".join(f"{k}:{v:.2f}" for k, v in r["kept"].items())
        line = (
            f"| {r['p']:g} | {r['loss']:.4f} | {r['perplexity']:.2f} | {r['c_eff']:.3f} | {kept} |"
        )
        if timed and "prefill_s" in r:
            line += (
                f" {r['prefill_s']:.3f} | {r['prefill_speedup_vs_p0']:.2f} | "
                f"{r['decode_ms_per_token']:.1f} | {r['decode_speedup_vs_p0']:.2f} |"
            )
        lines.append(line)
    return "\n".join(lines)


def plot(rows: list[dict], title: str, path: Path, timed: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("c_eff", "c_eff (fraction of token-layer pairs computed)")]
    if timed:
        panels.append(("prefill_speedup_vs_p0", "measured prefill speed-up vs p = 0"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        xs = [r[key] for r in rows]
        ys = [r["loss"] for r in rows]
        ax.scatter(xs, ys, color="tab:blue")
        for r in rows:
            ax.annotate(f"p={r['p']:g}", (r[key], r["loss"]), fontsize=8, xytext=(4, 4),
                        textcoords="offset points")  # fmt: skip
        front = sorted((r for r in rows if r[f"pareto_{key}"]), key=lambda r: r[key])
        ax.plot([r[key] for r in front], [r["loss"] for r in front], "--o", color="tab:orange",
                markerfacecolor="none", markersize=11, label="Pareto front")  # fmt: skip
        ax.set_xlabel(label)
        ax.set_ylabel("held-out loss (nats/token)")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, tokenizer = load_model(args.model)
        windows = load_windows(args, tokenizer, model.config.vocab_size)
    except USER_ERRORS as e:
        return report(e, "sweep_threshold.py")
    original_p = model.config.mod_threshold
    rows = []
    for p in args.p:
        model.set_mod_threshold(p)
        row = {"p": p, **score(model, windows, args.batch_size)}
        rows.append(row)
        print(f"p={p:g}: loss {row['loss']:.4f}, c_eff {row['c_eff']:.3f}", file=sys.stderr)
    timed = not args.no_speed
    speed_ref = None
    if timed:
        ctx = args.speed_context or args.seq_length
        flat = windows.flatten()
        if ctx > flat.numel():
            return report(
                SweepError(f"--speed-context {ctx} is more than the {flat.numel()} tokens read"),
                "sweep_threshold.py",
            )
        speed = measure_speed(
            model, flat[:ctx][None], args.p, args.speed_new_tokens, args.speed_rounds
        )
        for row in rows:
            row.update(speed[row["p"]])
        speed_ref = speed[0.0]
    model.set_mod_threshold(original_p)
    # Pareto fronts: lower loss with lower c_eff, and lower loss with higher measured speed-up.
    fronts = {"c_eff": pareto_front([(r["p"], r["c_eff"], r["loss"]) for r in rows])}
    if timed:
        fronts["prefill_speedup_vs_p0"] = pareto_front(
            [(r["p"], -r["prefill_speedup_vs_p0"], r["loss"]) for r in rows]
        )
    for key, front in fronts.items():
        for r in rows:
            r[f"pareto_{key}"] = r["p"] in front
    name = args.name or f"sweep_threshold_{Path(args.model).resolve().name}"
    result = {
        "tool": "sweep_threshold",
        "model": str(Path(args.model).resolve()),
        "data": args.data,
        "routed_layers": list(model.config.mod_routed_layers),
        "num_layers": model.config.num_hidden_layers,
        "gate": model.config.mod_gate,
        "export_threshold": original_p,
        "seq_length": args.seq_length,
        "num_sequences": int(windows.shape[0]),
        "torch_threads": torch.get_num_threads(),
        "speed_context": (args.speed_context or args.seq_length) if timed else None,
        "speed_new_tokens": args.speed_new_tokens if timed else None,
        "speed_p0": speed_ref,
        "rows": rows,
    }
    print()
    print(markdown_table(rows, timed))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / f"{name}.json", json.dumps(result, indent=1) + "\n")
    print(f"wrote {out_dir / f'{name}.json'}")
    if not args.no_plot:
        title = f"{Path(args.model).name}: threshold sweep on {Path(args.data).name}"
        plot(rows, title, out_dir / f"{name}.png", timed)
        print(f"wrote {out_dir / f'{name}.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
