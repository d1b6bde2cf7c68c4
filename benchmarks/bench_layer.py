"""Forward+backward cost of Mixture-of-Depths layers and models against their dense counterparts.

What is measured (all in ONE process, dense and MoD interleaved round by round so that clock and
thermal drift hit both equally; the reported number is the median over ``--repeats`` rounds):

* **layer**: one routed ``MoDTransformerLayer`` vs megatron-core's own dense ``TransformerLayer``
  built from the same spec and holding identical weights (the dense state dict is loaded into the
  MoD layer; only the router is extra). Input ``[s, b, h]`` with ``requires_grad``; RoPE
  frequencies from megatron's ``RotaryEmbedding``; causal attention; backward with a random
  upstream gradient.
* **model**: a whole LLaMA-shaped ``GPTModel`` (embedding, ``--layers`` layers, final norm, LM
  head and cross-entropy) with ``routed_layers="all"``, plus the default ``every_other`` layout as
  an extra row, vs the dense ``GPTModel`` (``mod_config=None``) with identical weights.

Kept fraction: ``routing="topk"`` with capacity ``c`` keeps exactly ``ceil(c * s)`` tokens of
every sequence, so the work per routed layer is fixed. A ``threshold`` row at ``c = 1`` (router
bias +30, every gate is 1.0 and every token is kept) measures the pure router + dispatch/combine
overhead of the MoD path.

Columns: ``ratio`` = MoD / dense time; ``ideal`` = the fraction of layer work that is kept
(``c`` for a layer; the mean over layers of the kept fraction for a model, which ignores the
unrouted embedding / LM head, so a model can never reach it); ``ratio/ideal`` and
``overhead = ratio - ideal``. Attention's score matrix scales with ``c**2``, so at long
sequences a layer can legitimately beat ``c``.

CPU runs go through the CPU compatibility patches of :mod:`megatron_mod.platform`, which keep a
global ``TorchFunctionMode`` on the stack. Its per-op Python cost is measured too (the dense
layer timed with and without the mode, plus a per-call micro-benchmark and the number of
intercepted calls per forward of each layer) so that readers can judge whether it distorts the
ratios. ``--profile`` prints the top operators of the dense and MoD layers (torch.profiler).

Results are printed as markdown tables and written to
``benchmarks/results/bench_layer_<device>.json``.

Examples::

    python benchmarks/bench_layer.py                      # CPU defaults (a few minutes)
    python benchmarks/bench_layer.py --seq-lens 1024,2048,4096 --hidden 1024 --layers 8 \\
        --device cuda --repeats 20 --warmup 5            # GPU, bf16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")

import torch  # noqa: E402
from host import device_info, device_tag, usable_cores  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_CAPACITIES = (1.0, 0.75, 0.5, 0.25, 0.125)
THRESHOLD_BIAS = 30.0  # sigmoid(30) == 1.0 in fp32: every token is kept under threshold routing.


# --------------------------------------------------------------------------- CLI and environment


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see ``--help``)."""
    p = argparse.ArgumentParser(
        description="Forward+backward time of MoD layers/models vs dense, in the same run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run")
    p.add_argument(
        "--seq-lens", default="1024,2048", help="comma list of sequence lengths for the layer rows"
    )
    p.add_argument(
        "--model-seq-lens",
        default=None,
        help="comma list of sequence lengths for the model rows (default: the first --seq-lens)",
    )
    p.add_argument("--hidden", type=int, default=512, help="hidden size h")
    p.add_argument("--heads", type=int, default=8, help="attention heads")
    p.add_argument("--query-groups", type=int, default=2, help="KV heads (GQA groups)")
    p.add_argument(
        "--ffn-hidden",
        type=int,
        default=None,
        help="SwiGLU width (default: LLaMA rule, 8h/3 rounded up to a multiple of 256)",
    )
    p.add_argument("--layers", type=int, default=4, help="layers of the whole-model measurement")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size of the model rows")
    p.add_argument("--batch", type=int, default=1, help="micro-batch size b")
    p.add_argument(
        "--capacities",
        default=",".join(str(c) for c in DEFAULT_CAPACITIES),
        help="comma list of top-k capacities c",
    )
    p.add_argument(
        "--skipped-kv-capacities",
        default="0.25,0.5",
        help="comma list of top-k capacities also timed with skipped_kv (skipped tokens still "
        "write K/V); empty for none",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up rounds")
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: all usable cores)"
    )
    p.add_argument("--skip-layer", action="store_true", help="skip the single-layer rows")
    p.add_argument("--skip-model", action="store_true", help="skip the whole-model rows")
    p.add_argument(
        "--skip-mode-overhead",
        action="store_true",
        help="skip measuring the CPU TorchFunctionMode overhead",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also print torch.profiler top ops of the dense and MoD layers (first seq len)",
    )
    p.add_argument("--seed", type=int, default=1234, help="random seed")
    p.add_argument(
        "--output",
        default=None,
        help="JSON path (default: benchmarks/results/bench_layer_<device>.json)",
    )
    args = p.parse_args(argv)
    args.seq_lens = _int_list(args.seq_lens)
    args.model_seq_lens = (
        _int_list(args.model_seq_lens) if args.model_seq_lens else args.seq_lens[:1]
    )
    args.capacities = [float(c) for c in args.capacities.split(",") if c.strip()]
    args.skipped_kv_capacities = [
        float(c) for c in args.skipped_kv_capacities.split(",") if c.strip()
    ]
    for c in args.capacities + args.skipped_kv_capacities:
        if not 0.0 < c <= 1.0:
            p.error(f"capacity {c} is outside (0, 1]")
    if args.ffn_hidden is None:
        args.ffn_hidden = 256 * math.ceil(8 * args.hidden / 3 / 256)
    if args.hidden % args.heads or args.heads % args.query_groups:
        p.error("--heads must divide --hidden and --query-groups must divide --heads")
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages: other processes on the machine disturb CPU timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# --------------------------------------------------------------------------- timing


@dataclass
class Case:
    """One thing to time: ``prepare`` runs untimed before each call of ``run``."""

    name: str
    run: Callable[[], None]
    prepare: Callable[[], None] = lambda: None
    times_ms: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def min_ms(self) -> float:
        return min(self.times_ms)


def time_interleaved(cases: list[Case], repeats: int, warmup: int, sync: Callable[[], None]):
    """Run every case once per round, rotating the order each round, and record wall times.

    Interleaving puts dense and MoD measurements side by side in time so that frequency or
    thermal drift, and the state of the allocator, affect both alike.
    """
    for _ in range(warmup):
        for case in cases:
            case.prepare()
            case.run()
    sync()
    for r in range(repeats):
        order = cases[r % len(cases) :] + cases[: r % len(cases)]
        for case in order:
            case.prepare()
            sync()
            t0 = time.perf_counter()
            case.run()
            sync()
            case.times_ms.append((time.perf_counter() - t0) * 1e3)


# --------------------------------------------------------------------------- builders


def build_config(args, num_layers: int):
    """A LLaMA-shaped TransformerConfig (bf16 on CUDA, fp32 on CPU)."""
    from megatron_mod.models import llama_config

    extra = {}
    if args.device == "cuda":
        extra = dict(bf16=True, params_dtype=torch.bfloat16)
    return llama_config(
        "tiny",
        num_layers=num_layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        num_query_groups=args.query_groups,
        ffn_hidden_size=args.ffn_hidden,
        **extra,
    )


def mod_variants(
    capacities: list[float], skipped_kv_capacities: list[float] = ()
) -> list[tuple[str, float, object]]:
    """(label, kept fraction, MoDConfig) of every MoD variant timed."""
    from megatron_mod.config import MoDConfig

    variants = [
        (f"topk c={c:g}", c, MoDConfig(routing="topk", capacity=c, routed_layers="all"))
        for c in capacities
    ]
    variants += [
        (
            f"topk c={c:g} skipped K/V",
            c,
            MoDConfig(routing="topk", capacity=c, routed_layers="all", skipped_kv=True),
        )
        for c in skipped_kv_capacities
    ]
    variants.append(
        (
            "threshold c=1",
            1.0,
            MoDConfig(
                routing="threshold",
                threshold=0.5,
                router_init_bias=THRESHOLD_BIAS,
                routed_layers="all",
            ),
        )
    )
    return variants


def build_layers(tc, variants):
    """The dense layer and one MoD layer per variant, all with the dense layer's weights."""
    from megatron.core.transformer.spec_utils import build_module

    from megatron_mod.specs import get_dense_layer_spec, get_mod_layer_spec

    dense = build_module(get_dense_layer_spec(), config=tc, layer_number=1)
    state = dense.state_dict()
    mods = []
    for _, _, mod_cfg in variants:
        layer = build_module(get_mod_layer_spec(mod_cfg), config=tc, layer_number=1)
        missing, unexpected = layer.load_state_dict(state, strict=False)
        extra = [k for k in missing if not k.startswith("router.")]
        if extra or unexpected:
            raise RuntimeError(f"weights do not match: missing {extra}, unexpected {unexpected}")
        mods.append(layer)
    return dense, mods


def rotary(tc, seq_len: int, device: str):
    """RoPE frequencies [s, 1, 1, d] from megatron's RotaryEmbedding."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = RotaryEmbedding(
        kv_channels=tc.kv_channels,
        rotary_percent=1.0,
        rotary_base=int(getattr(tc, "rotary_base", 10000)),
        use_cpu_initialization=device == "cpu",
    )
    return rope(seq_len)


def layer_step(layer, x, grad_out, rope, attention_mask=None):
    """One forward+backward of a transformer layer (returns a runnable and its prepare)."""

    def prepare():
        layer.zero_grad(set_to_none=True)
        x.grad = None

    def run():
        out, _ = layer(x, attention_mask=attention_mask, rotary_pos_emb=rope)
        out.backward(grad_out)

    return run, prepare


def model_step(model, tokens, positions, labels):
    """One forward+backward of a GPTModel on next-token cross-entropy."""

    def prepare():
        model.zero_grad(set_to_none=True)

    def run():
        loss = model(tokens, positions, None, labels=labels)
        loss.float().mean().backward()

    return run, prepare


# --------------------------------------------------------------------------- measurements


def layer_flops(args, tokens: int, keys: int | None = None) -> float:
    """Forward matmul FLOPs of one LLaMA layer on ``tokens`` tokens of one sequence (x batch).

    Linear layers scale with the token count; megatron's local attention computes the full
    score matrix (then masks it), so attention scales with queries x keys. Backward is twice
    the forward for every matmul, so ratios of this count are the fwd+bwd FLOP ratios.

    ``keys``: a ``skipped_kv`` layer, whose ``keys - tokens`` skipped tokens run the K/V
    projections only (the ideal; megatron's fused QKV also computes their queries) and whose
    ``tokens`` queries attend to all ``keys``.
    """
    h, kv = args.hidden, args.hidden // args.heads * args.query_groups
    linear = 2 * h * (h + 2 * kv) + 2 * h * h + 2 * 3 * h * args.ffn_hidden
    keys = tokens if keys is None else keys
    attention = 2 * 2 * tokens * keys * h
    kv_only = (keys - tokens) * 2 * h * 2 * kv
    return args.batch * (tokens * linear + attention + kv_only)


def flop_ideal(args, seq: int, mod_cfg, num_layers: int, with_head: bool) -> float:
    """MoD / dense matmul FLOPs: the speed-up a perfect implementation would show.

    For a whole model the unrouted LM head (``2 * h * vocab`` per token) is included.
    """
    kept = 1.0 if mod_cfg.routing == "threshold" else mod_cfg.capacity
    routed = set(mod_cfg.routed_layer_indices(num_layers))
    head = 2 * args.hidden * args.vocab * seq * args.batch if with_head else 0.0
    k = min(seq, max(1, math.ceil(kept * seq)))
    keys = seq if mod_cfg.skipped_kv else None
    mod = sum(
        layer_flops(args, k, keys) if i in routed else layer_flops(args, seq)
        for i in range(num_layers)
    )
    return (mod + head) / (num_layers * layer_flops(args, seq) + head)


def rows_from(dense: Case, mods: list[Case], ideals, flop_ideals, seq: int, kind: str):
    """Table rows of one sequence length: MoD vs dense medians, ideals and overheads."""
    rows = []
    for case, ideal, fideal in zip(mods, ideals, flop_ideals):
        ratio = case.median_ms / dense.median_ms
        rows.append(
            dict(
                kind=kind,
                variant=case.name,
                seq=seq,
                dense_ms=round(dense.median_ms, 3),
                mod_ms=round(case.median_ms, 3),
                ratio=round(ratio, 4),
                ratio_of_min_times=round(case.min_ms / dense.min_ms, 4),
                ideal=round(ideal, 4),
                ratio_over_ideal=round(ratio / ideal, 4),
                overhead=round(ratio - ideal, 4),
                flop_ideal=round(fideal, 4),
                dense_ms_all=[round(t, 3) for t in dense.times_ms],
                mod_ms_all=[round(t, 3) for t in case.times_ms],
            )
        )
    return rows


def measure_layers(args, sync) -> list[dict]:
    """Dense vs MoD single-layer rows for every sequence length and capacity."""
    from megatron_mod.router import set_load_loss_scale

    set_load_loss_scale(1)
    tc = build_config(args, num_layers=1)
    variants = mod_variants(args.capacities, args.skipped_kv_capacities)
    dense, mods = build_layers(tc, variants)
    dtype = tc.params_dtype
    for m in (dense, *mods):
        m.train()
    rows = []
    for seq in args.seq_lens:
        gen = torch.Generator(device=args.device).manual_seed(args.seed)
        shape = (seq, args.batch, args.hidden)
        x = torch.randn(shape, generator=gen, device=args.device, dtype=dtype).requires_grad_()
        grad_out = torch.randn(shape, generator=gen, device=args.device, dtype=dtype)
        rope = rotary(tc, seq, args.device)
        dense_case = Case("dense", *layer_step(dense, x, grad_out, rope))
        mod_cases = [
            Case(label, *layer_step(m, x, grad_out, rope))
            for (label, _, _), m in zip(variants, mods)
        ]
        t0 = time.perf_counter()
        time_interleaved([dense_case, *mod_cases], args.repeats, args.warmup, sync)
        fl = [flop_ideal(args, seq, v[2], 1, with_head=False) for v in variants]
        rows += rows_from(dense_case, mod_cases, [v[1] for v in variants], fl, seq, "layer")
        print(f"  layer seq={seq}: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return rows


@contextlib.contextmanager
def inner_layer_stubbed():
    """Replace the dense attention+MLP that a MoD layer calls with the identity.

    What remains of a MoD layer's fwd+bwd is exactly its own machinery: router, token selection,
    load loss and metrics, dispatch (gather + RoPE compaction), combine (gate + scatter) and their
    backward passes.
    """
    from megatron.core.transformer.transformer_layer import TransformerLayer

    original = TransformerLayer.forward

    def identity(self, hidden_states, **kwargs):
        return hidden_states, kwargs.get("context")

    TransformerLayer.forward = identity
    try:
        yield
    finally:
        TransformerLayer.forward = original


def measure_wrapper_overhead(args, sync, layer_rows: list[dict]) -> list[dict]:
    """Absolute cost (ms) of the MoD machinery alone, with the inner layer stubbed out.

    Expressed also as a percentage of the dense layer time measured in the layer rows.
    """
    tc = build_config(args, num_layers=1)
    variants = [
        v for v in mod_variants([1.0, 0.25]) if v[0] in ("threshold c=1", "topk c=1", "topk c=0.25")
    ]
    _, mods = build_layers(tc, variants)
    dense_ms = {r["seq"]: r["dense_ms"] for r in layer_rows if r["variant"] == "topk c=1"}
    rows = []
    with inner_layer_stubbed():
        for seq in args.seq_lens:
            gen = torch.Generator(device=args.device).manual_seed(args.seed)
            shape = (seq, args.batch, args.hidden)
            dtype = tc.params_dtype
            x = torch.randn(shape, generator=gen, device=args.device, dtype=dtype)
            x.requires_grad_()
            grad_out = torch.randn(shape, generator=gen, device=args.device, dtype=dtype)
            rope = rotary(tc, seq, args.device)
            cases = [
                Case(label, *layer_step(m, x, grad_out, rope))
                for (label, _, _), m in zip(variants, mods)
            ]
            for m in mods:
                m.train()
            time_interleaved(cases, max(args.repeats, 5), max(args.warmup, 1), sync)
            for case in cases:
                row = dict(variant=case.name, seq=seq, wrapper_ms=round(case.median_ms, 3))
                if seq in dense_ms:
                    row["pct_of_dense_layer"] = round(100 * case.median_ms / dense_ms[seq], 2)
                rows.append(row)
    return rows


def measure_models(args, sync) -> list[dict]:
    """Dense vs MoD whole-model rows (routed_layers='all', plus 'every_other')."""
    from megatron_mod.config import MoDConfig
    from megatron_mod.models import build_gpt_model
    from megatron_mod.router import set_load_loss_scale

    set_load_loss_scale(1)
    max_seq = max(args.model_seq_lens)
    tc = build_config(args, num_layers=args.layers)
    variants = mod_variants(args.capacities)
    n = args.layers
    routed_odd = len(range(1, n, 2))
    for c in sorted({min(args.capacities), 0.5}, reverse=True):
        cfg = MoDConfig(routing="topk", capacity=c, routed_layers="every_other")
        ideal = (n - routed_odd + routed_odd * c) / n
        variants.append((f"every_other topk c={c:g}", ideal, cfg))
    dense = build_gpt_model(tc, None, vocab_size=args.vocab, max_seq_len=max_seq)
    state = dense.state_dict()
    mods = []
    for _, _, cfg in variants:
        model = build_gpt_model(tc, cfg, vocab_size=args.vocab, max_seq_len=max_seq)
        missing, unexpected = model.load_state_dict(state, strict=False)
        extra = [k for k in missing if ".router." not in k]
        if extra or unexpected:
            raise RuntimeError(f"weights do not match: missing {extra}, unexpected {unexpected}")
        mods.append(model)
    for m in (dense, *mods):
        m.train()
    rows = []
    for seq in args.model_seq_lens:
        gen = torch.Generator(device=args.device).manual_seed(args.seed)
        data = torch.randint(
            0, args.vocab, (args.batch, seq + 1), generator=gen, device=args.device
        )
        tokens, labels = data[:, :-1].contiguous(), data[:, 1:].contiguous()
        positions = torch.arange(seq, device=args.device)[None].expand(args.batch, -1)
        dense_case = Case("dense", *model_step(dense, tokens, positions, labels))
        mod_cases = [
            Case(label, *model_step(m, tokens, positions, labels))
            for (label, _, _), m in zip(variants, mods)
        ]
        t0 = time.perf_counter()
        time_interleaved([dense_case, *mod_cases], args.repeats, args.warmup, sync)
        fl = [flop_ideal(args, seq, v[2], args.layers, with_head=True) for v in variants]
        rows += rows_from(dense_case, mod_cases, [v[1] for v in variants], fl, seq, "model")
        print(f"  model seq={seq}: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return rows


class _CountingMode(torch.overrides.TorchFunctionMode):
    """Counts torch-function calls (what any TorchFunctionMode on the stack intercepts)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def measure_mode_overhead(args, sync) -> dict:
    """Cost of the CPU patches' global TorchFunctionMode.

    * the dense layer's fwd+bwd with the mode active vs suspended (an explicit causal mask is
      passed, since megatron's default mask is created with ``device="cuda"``, which only runs
      through the mode);
    * a micro-benchmark of the per-call cost (a tiny ``torch.add``);
    * the number of intercepted calls in one forward of the dense and MoD layers (backward runs in
      C++ autograd and is not intercepted), times the per-call cost.
    """
    from megatron_mod import platform as mm_platform
    from megatron_mod.config import MoDConfig

    mode = mm_platform._CPU_MODE
    if mode is None:
        return {"active": False, "note": "no TorchFunctionMode installed (CUDA host)"}

    seq = args.seq_lens[0]
    tc = build_config(args, num_layers=1)
    variants = [("topk c=0.25", 0.25, MoDConfig(routing="topk", capacity=0.25))]
    dense, (mod,) = build_layers(tc, variants)
    dense.train()
    mod.train()
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(seq, args.batch, args.hidden, generator=gen).requires_grad_()
    grad_out = torch.randn(seq, args.batch, args.hidden, generator=gen)
    rope = rotary(tc, seq, "cpu")
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]
    run, prepare = layer_step(dense, x, grad_out, rope, attention_mask=mask)

    def timed(n: int) -> list[float]:
        out = []
        for _ in range(n):
            prepare()
            t0 = time.perf_counter()
            run()
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    def per_call_us(n: int = 20000) -> float:
        a, b = torch.zeros(4), torch.ones(4)
        t0 = time.perf_counter()
        for _ in range(n):
            torch.add(a, b)
        return (time.perf_counter() - t0) / n * 1e6

    with_mode, without_mode = [], []
    timed(args.warmup)
    for _ in range(args.repeats):
        with_mode += timed(1)
        mode.__exit__(None, None, None)
        try:
            without_mode += timed(1)
        finally:
            mode.__enter__()
    us_with = min(per_call_us() for _ in range(3))
    mode.__exit__(None, None, None)
    try:
        us_without = min(per_call_us() for _ in range(3))
    finally:
        mode.__enter__()

    calls = {}
    for name, layer in (("dense", dense), ("mod_topk_c0.25", mod)):
        with torch.no_grad(), _CountingMode() as counter:
            layer(x, attention_mask=None, rotary_pos_emb=rope)
        calls[name] = counter.calls
    per_call_extra_us = us_with - us_without
    w, wo = statistics.median(with_mode), statistics.median(without_mode)
    return {
        "active": True,
        "seq": seq,
        "dense_layer_ms_with_mode": round(w, 3),
        "dense_layer_ms_without_mode": round(wo, 3),
        "dense_layer_overhead_pct": round(100 * (w - wo) / wo, 2),
        "per_call_us_with_mode": round(us_with, 3),
        "per_call_us_without_mode": round(us_without, 3),
        "intercepted_calls_per_forward": calls,
        "estimated_mode_ms_per_forward": {
            k: round(v * per_call_extra_us / 1e3, 3) for k, v in calls.items()
        },
    }


def profile_layers(args, top: int = 15) -> dict:
    """torch.profiler self-time tables of the dense and two MoD layers (fwd+bwd)."""
    from torch.profiler import ProfilerActivity, profile

    tc = build_config(args, num_layers=1)
    variants = [v for v in mod_variants([0.25]) if v[0] in ("topk c=0.25", "threshold c=1")]
    dense, mods = build_layers(tc, variants)
    seq = args.seq_lens[0]
    dtype = tc.params_dtype
    x = torch.randn(seq, args.batch, args.hidden, device=args.device, dtype=dtype)
    x.requires_grad_()
    grad_out = torch.randn_like(x)
    rope = rotary(tc, seq, args.device)
    activities = [ProfilerActivity.CPU]
    if args.device == "cuda":
        activities.append(ProfilerActivity.CUDA)
    sort_by = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    tables = {}
    for name, layer in (("dense", dense), *zip([v[0] for v in variants], mods)):
        layer.train()
        run, prepare = layer_step(layer, x, grad_out, rope)
        for _ in range(2):
            prepare()
            run()
        with profile(activities=activities) as prof:
            for _ in range(3):
                prepare()
                run()
        table = prof.key_averages().table(sort_by=sort_by, row_limit=top)
        print(f"\n### profile: {name} layer, seq={seq} (3 fwd+bwd)\n{table}")
        tables[name] = table
    return tables


# --------------------------------------------------------------------------- report


def markdown_table(rows: list[dict]) -> str:
    head = (
        "| rows | variant | seq | dense ms | MoD ms | ratio MoD/dense | ideal | ratio/ideal "
        "| overhead | ratio of min times | FLOP ratio |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['variant']} | {r['seq']} | {r['dense_ms']:.1f} | "
            f"{r['mod_ms']:.1f} | {r['ratio']:.3f} | {r['ideal']:.3f} | "
            f"{r['ratio_over_ideal']:.3f} | {r['overhead']:+.3f} | "
            f"{r['ratio_of_min_times']:.3f} | {r['flop_ideal']:.3f} |"
        )
    return "\n".join(lines)


def check_targets(layer_rows: list[dict]) -> dict:
    """The spec's targets: layer c=0.25 <= 0.35 x dense; threshold c=1 overhead <= 5%."""
    out = {}
    for r in layer_rows:
        if r["variant"] == "topk c=0.25":
            out[f"layer_c0.25_seq{r['seq']}_ratio<=0.35"] = {
                "value": r["ratio"],
                "met": r["ratio"] <= 0.35,
            }
        if r["variant"] == "threshold c=1":
            out[f"layer_threshold_c1_seq{r['seq']}_overhead<=5%"] = {
                "value": round(r["ratio"] - 1.0, 4),
                "met": r["ratio"] - 1.0 <= 0.05,
            }
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda was requested but CUDA is not available", file=sys.stderr)
        return 2
    if args.device == "cpu" and torch.cuda.is_available():
        print(
            "--device cpu on a CUDA host is not supported (megatron-core places modules on "
            "CUDA there); use --device cuda",
            file=sys.stderr,
        )
        return 2
    torch.set_num_threads(args.threads or usable_cores())

    from megatron_mod import platform as mm_platform

    mm_platform.initialize(tp=1, pp=1, seed=args.seed)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    info = device_info(args.device)
    print(f"device: {json.dumps(info)}", file=sys.stderr)

    t_start = time.perf_counter()
    result = {
        "load_average_at_start": _loadavg(),
        "device": info,
        "settings": {
            k: v
            for k, v in vars(args).items()
            if k not in ("output", "skip_layer", "skip_model", "skip_mode_overhead", "profile")
        },
        "dtype": "bf16" if args.device == "cuda" else "fp32",
    }
    layer_rows = [] if args.skip_layer else measure_layers(args, sync)
    model_rows = [] if args.skip_model else measure_models(args, sync)
    result["layer"] = layer_rows
    if layer_rows:
        result["mod_wrapper_overhead"] = measure_wrapper_overhead(args, sync, layer_rows)
    result["model"] = model_rows
    result["targets"] = check_targets(layer_rows)
    if not args.skip_mode_overhead and args.device == "cpu":
        result["cpu_function_mode_overhead"] = measure_mode_overhead(args, sync)
    if args.profile:
        result["profile"] = profile_layers(args)
    result["load_average_at_end"] = _loadavg()
    result["total_runtime_s"] = round(time.perf_counter() - t_start, 1)

    print(f"\n## {info['device']}: {info.get('gpu') or info['cpu']} ({info['cpu_cores']} cores)")
    print(f"torch {info['torch']}, megatron-core {info['megatron_core']}, {result['dtype']}\n")
    print(markdown_table(layer_rows + model_rows))
    print("\ntargets:", json.dumps(result["targets"], indent=1))
    if result.get("mod_wrapper_overhead"):
        print("\nMoD machinery alone (inner layer stubbed out):")
        for r in result["mod_wrapper_overhead"]:
            pct = r.get("pct_of_dense_layer")
            extra = f" = {pct:.2f}% of the dense layer" if pct is not None else ""
            print(f"  {r['variant']:>14} seq={r['seq']}: {r['wrapper_ms']:.2f} ms{extra}")
    print("load average start/end:", result["load_average_at_start"], result["load_average_at_end"])
    if "cpu_function_mode_overhead" in result:
        print("TorchFunctionMode:", json.dumps(result["cpu_function_mode_overhead"], indent=1))

    out = Path(args.output) if args.output else RESULTS_DIR / f"bench_layer_{device_tag(info)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {out}")
    mm_platform.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
