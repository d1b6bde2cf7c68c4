"""Conversion benchmark: wall time and peak RSS of HF -> Megatron import and Megatron -> HF export.

Generates a LLaMA-shaped random model (default: hidden 2048, 12 layers, GQA 16/4 heads, SwiGLU
5632, vocab 32000: 0.67 B parameters, 2.7 GB in fp32) directly as sharded safetensors (tensor by
tensor, never instantiating the model), runs both converter CLIs as subprocesses while polling
their RSS (process tree) with psutil, checks a few exported tensors against the source, and
prints a table and writes ``benchmarks/results/bench_convert_cpu-<cpu>-<cores>c.json``.

Runs: import for TP 1 / PP 1, import for TP 2 / PP 2 (``--tp``/``--pp`` only change the vocabulary
padding and validation: the checkpoint always holds full tensors, one process writes it), and
export of the TP 1 checkpoint. Children run with ``OMP_NUM_THREADS=1``.

Usage: python benchmarks/bench_convert.py [--work-dir DIR] [--layers 12] [--keep] [--no-tp2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform as py_platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from host import cpu_name, cpu_tag, run_with_peak_memory, usable_cores

REPO = Path(__file__).resolve().parents[1]


def default_result_path() -> Path:
    """``benchmarks/results/bench_convert_cpu-<cpu model>-<cores>c.json``."""
    return REPO / "benchmarks" / "results" / f"bench_convert_{cpu_tag()}.json"


def make_hf_model(out: Path, hidden, layers, heads, kv_heads, ffn, vocab, shard_bytes) -> int:
    """Write a random LLaMA checkpoint as sharded safetensors; returns its size in bytes."""
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    head_dim = hidden // heads
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen) * 0.02

    def tensors():
        yield "model.embed_tokens.weight", randn(vocab, hidden)
        for i in range(layers):
            p = f"model.layers.{i}."
            yield p + "input_layernorm.weight", torch.ones(hidden)
            yield p + "self_attn.q_proj.weight", randn(heads * head_dim, hidden)
            yield p + "self_attn.k_proj.weight", randn(kv_heads * head_dim, hidden)
            yield p + "self_attn.v_proj.weight", randn(kv_heads * head_dim, hidden)
            yield p + "self_attn.o_proj.weight", randn(hidden, heads * head_dim)
            yield p + "post_attention_layernorm.weight", torch.ones(hidden)
            yield p + "mlp.gate_proj.weight", randn(ffn, hidden)
            yield p + "mlp.up_proj.weight", randn(ffn, hidden)
            yield p + "mlp.down_proj.weight", randn(hidden, ffn)
        yield "model.norm.weight", torch.ones(hidden)
        yield "lm_head.weight", randn(vocab, hidden)

    # Write each shard as soon as it is full (names fixed up once the count is known).
    files: list[list[str]] = []
    current, size, total = {}, 0, 0

    def flush():
        nonlocal current, size
        save_file(current, out / f"part-{len(files)}.safetensors", metadata={"format": "pt"})
        files.append(list(current))
        current, size = {}, 0

    for name, tensor in tensors():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > shard_bytes:
            flush()
        current[name] = tensor
        size += nbytes
        total += nbytes
    if current:
        flush()
    weight_map = {}
    for i, names in enumerate(files):
        file = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        os.replace(out / f"part-{i}.safetensors", out / file)
        weight_map.update({k: file for k in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        hidden_act="silu",
        tie_word_embeddings=False,
        torch_dtype="float32",
        bos_token_id=1,
        eos_token_id=2,
    )
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return total


def run_measured(cmd: list[str]) -> dict:
    """Run a command; poll the RSS of its process tree every 20 ms."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    # One thread: conversion is copy/IO bound, and the machine's other cores stay free.
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    res, wall, peak = run_with_peak_memory(cmd, env, measure="rss", interval_s=0.02)
    if res.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_bytes": peak, "stdout": res.stdout}


def baseline_rss() -> int:
    """Peak RSS of a process that only imports the converter stack and initialises megatron.

    Read from ``VmHWM`` (and the poller), not ``ru_maxrss``, which Linux carries over from the
    parent across fork + exec: this process holds a source shard's worth of memory by then.
    """
    code = (
        "import time, megatron_mod.hf.convert, transformers\n"
        "from megatron_mod import platform; platform.initialize()\n"
        "from megatron_mod.hf.io import peak_rss_bytes\n"
        "time.sleep(0.3)\n"
        "print(peak_rss_bytes())\n"
    )
    run = run_measured([sys.executable, "-c", code])
    return max(int(run["stdout"].split()[-1]), run["peak_rss_bytes"])


def self_reported_peak(stdout: str) -> int | None:
    """The ``peak RSS`` line of a converter's summary (its own VmHWM), in bytes."""
    match = re.search(r"peak RSS\s*:\s*([0-9.]+) GB", stdout)
    return int(float(match.group(1)) * 1e9) if match else None


def check_export(src: Path, exported: Path, names: list[str]) -> None:
    from safetensors import safe_open

    def find(d: Path, name: str):
        index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
        with safe_open(d / index[name], framework="pt") as f:
            return f.get_tensor(name)

    for name in names:
        if not torch.equal(find(src, name), find(exported, name)):
            raise AssertionError(f"exported {name} differs from the source")


def part_bytes(args) -> dict[str, int]:
    """fp32 bytes of the converters' units of work: one layer, and the embedding (= the head)."""
    head_dim = args.hidden // args.heads
    layer = 4 * (
        2 * args.hidden * args.hidden  # q, o
        + 2 * args.hidden * head_dim * args.kv_heads  # k, v
        + 3 * args.hidden * args.ffn  # gate, up, down
        + 2 * args.hidden  # norms
    )
    return {"layer": layer, "embedding": 4 * args.vocab * args.hidden}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work-dir", default=None, help="scratch dir (default: a temp dir)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shard-size-mb", type=int, default=1000, help="source and export shard size")
    p.add_argument("--no-tp2", action="store_true", help="skip the TP 2 / PP 2 import")
    p.add_argument("--keep", action="store_true", help="keep the scratch dir")
    p.add_argument("--out", default=None, help="JSON path (default: results/bench_convert_<cpu>)")
    args = p.parse_args()
    out_path = Path(args.out) if args.out else default_result_path()

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_convert_"))
    work.mkdir(parents=True, exist_ok=True)
    hf, ckpt, export = work / "hf", work / "megatron", work / "hf_export"
    ckpt_tp2 = work / "megatron_tp2pp2"
    for d in (hf, ckpt, export, ckpt_tp2):
        shutil.rmtree(d, ignore_errors=True)
    tools = REPO / "tools"
    runs: dict[str, dict] = {}
    try:
        t0 = time.time()
        size = make_hf_model(
            hf,
            args.hidden,
            args.layers,
            args.heads,
            args.kv_heads,
            args.ffn,
            args.vocab,
            args.shard_size_mb * 10**6,
        )
        gen_s = time.time() - t0
        floor = baseline_rss()
        load_before = os.getloadavg()
        runs["import_tp1_pp1"] = run_measured(
            [sys.executable, str(tools / "convert_hf_to_megatron.py"), "--hf-dir", str(hf),
             "--out-dir", str(ckpt), "--tp", "1", "--pp", "1", "--no-progress"]
        )  # fmt: skip
        if not args.no_tp2:
            runs["import_tp2_pp2"] = run_measured(
                [sys.executable, str(tools / "convert_hf_to_megatron.py"), "--hf-dir", str(hf),
                 "--out-dir", str(ckpt_tp2), "--tp", "2", "--pp", "2", "--no-progress"]
            )  # fmt: skip
            shutil.rmtree(ckpt_tp2, ignore_errors=True)  # same tensors as the TP 1 one
        # The MoD export (routers + modeling files) when the HF modeling code is installed.
        modeling = REPO / "megatron_mod" / "hf" / "modeling_llama_mod.py"
        export_mode = "mod" if modeling.is_file() else "dense"
        runs["export"] = run_measured(
            [sys.executable, str(tools / "convert_megatron_to_hf.py"), "--ckpt-dir", str(ckpt),
             "--out-dir", str(export), "--max-shard-size", f"{args.shard_size_mb}MB",
             "--no-progress"] + (["--dense"] if export_mode == "dense" else [])
        )  # fmt: skip
        load_after = os.getloadavg()
        last = args.layers - 1
        check_export(
            hf,
            export,
            [
                "model.embed_tokens.weight",
                f"model.layers.{last // 2}.self_attn.k_proj.weight",
                f"model.layers.{last}.mlp.up_proj.weight",
                "lm_head.weight",
            ],
        )
        export_files = sorted(f.name for f in export.iterdir())
    finally:
        if not args.keep and args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)

    import megatron.core

    parts = part_bytes(args)
    result = {
        "device": {
            "cpu": cpu_name(),
            "cores": usable_cores(),
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "gpu": None,
            "child_threads": 1,
            "loadavg_before_after": [round(x, 2) for x in (*load_before, *load_after)],
        },
        "software": {
            "python": py_platform.python_version(),
            "torch": torch.__version__,
            "megatron_core": megatron.core.__version__,
        },
        "model": {
            "hidden": args.hidden,
            "layers": args.layers,
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "ffn": args.ffn,
            "vocab": args.vocab,
            "params": size // 4,
            "fp32_bytes": size,
            "layer_bytes": parts["layer"],
            "embedding_bytes": parts["embedding"],
            "source_shard_bytes": args.shard_size_mb * 10**6,
        },
        "generate_s": round(gen_s, 1),
        "floor_rss_bytes": floor,
        "export_mode": export_mode,
        "export_files": export_files,
        "runs": {},
    }
    for key, run in runs.items():
        r = {k: v for k, v in run.items() if k != "stdout"}
        r["self_reported_peak_rss_bytes"] = self_reported_peak(run["stdout"])
        r["peak_rss_over_model_size"] = round(r["peak_rss_bytes"] / size, 3)
        r["peak_rss_above_floor_bytes"] = r["peak_rss_bytes"] - floor
        r["above_floor_over_largest_part"] = round(
            r["peak_rss_above_floor_bytes"] / max(parts.values()), 2
        )
        r["throughput_gb_s"] = round(size / 1e9 / r["wall_s"], 3)
        result["runs"][key] = r
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")

    gb = 1e9
    print(
        f"model: {size / 4e9:.2f} B params, {size / gb:.2f} GB fp32, {len(export_files)} export "
        f"files ({export_mode}); largest part {max(parts.values()) / gb:.2f} GB; "
        f"{result['device']['cpu']}, {result['device']['cores']} cores"
    )
    print("| run | wall s | GB/s | peak RSS GB | RSS / model | above floor GB | / largest part |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for key, r in result["runs"].items():
        print(
            f"| {key} | {r['wall_s']:.1f} | {r['throughput_gb_s']:.3f} | "
            f"{r['peak_rss_bytes'] / gb:.2f} | {r['peak_rss_over_model_size']:.3f} | "
            f"{r['peak_rss_above_floor_bytes'] / gb:.2f} | {r['above_floor_over_largest_part']} |"
        )
    print(f"floor (imports + megatron init only): {floor / gb:.2f} GB; wrote {out_path}")


if __name__ == "__main__":
    main()
