"""Router calibration: choose where to route, how much, and start routers that know which tokens.

A converted model whose routers are zero gives every token of a layer the same logit, so the
first training steps decide *which* tokens a layer skips from nothing. Calibration replaces that
guess with measurements on a few thousand tokens of text, the base model frozen:

1. **Importance of every layer.** Block influence (``1 - cos(h_in, h_out)``, ShortGPT's score)
   and the held-out loss increase when the layer is skipped outright.
2. **A router per candidate layer, fitted to a per-token label.** The label is the log relative
   update ``log(||f(h) - h|| / ||h||)`` of the token in that layer; a ridge regression from the
   router's own input (``h / rms(h)`` by default) predicts it. The held-out correlation between
   prediction and label is reported per layer.
3. **Per-layer budgets for a requested c_eff.** Each candidate layer's loss increase ``D_j``
   when its router skips ``probe_skip`` of the tokens is measured one layer at a time. The
   default (``concentrated``) skips ``max_skip`` of the tokens in the cheapest layers, in order
   of ``D_j``, until the requested compute is reached; ``spread`` assumes a convex cost
   ``D_j * (s_j / probe_skip)^2`` instead, whose minimiser shares the skipping out as
   ``s_j = min(max_skip, mu / D_j)`` (water-filling). Measured on SmolLM2 at c_eff 0.85, before
   any training: concentrated 3.48 nats held out, spread 3.98 (base 3.06); skipping in a few
   layers costs less than a little skipping in many.
4. **Thresholds for a starting c_eff.** Each router's bias is set so that the global threshold
   p keeps the layer's starting fraction of the calibration tokens; the budgets are stored as
   ``MoDConfig.layer_kept_targets``, which the trainer's compute target (``--mod-target-compute``)
   anneals towards.

The plan is then checked as a whole on the held-out windows: the loss with every routed layer at
its budget, the same with the first token routable (what the attention sink is worth), the same
budgets with random routing, and whole-layer removal (lowest block influence) at the same c_eff.
The result is an ordinary megatron-mod checkpoint (written by the HF importer, with the fitted
routers) whose metadata records the calibration.

Memory: the ridge statistics take ``8 * (h + 1)^2`` bytes per candidate layer (float64), e.g.
2.7 MB for SmolLM2-135M and 540 MB for a hidden size of 8192.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from megatron_mod.config import MoDConfig
from megatron_mod.errors import MegatronModError
from megatron_mod.router import gate_threshold_logit

__all__ = [
    "CalibrationError",
    "CalibrationPlan",
    "CalibrationSettings",
    "allocate_skips",
    "concentrate_skips",
    "calibrate_hf_llama",
    "fit_ridge",
]


ALLOCATIONS = ("concentrated", "spread")


class CalibrationError(MegatronModError, ValueError):
    """Bad input to the calibration (the message names the flag or file and what to do)."""


@dataclass
class CalibrationSettings:
    """What the calibration aims for and how it measures."""

    target_compute: float
    """c_eff the per-layer budgets add up to (fraction of (token, layer) pairs computed)."""

    start_compute: float = 1.0
    """c_eff the written checkpoint routes at before training (target <= start <= 1)."""

    max_skip: float = 0.75
    """Largest fraction of tokens one routed layer may skip."""

    min_skip: float = 0.05
    """A layer whose share of the skipping would be below this stays dense (not routed)."""

    probe_skip: float = 0.5
    """Fraction of tokens each candidate's fitted router skips when its loss cost is probed."""

    allocation: str = "concentrated"
    """`concentrated`: max_skip in the cheapest layers first; `spread`: s_j ~ 1 / cost_j."""

    never_route: tuple[int, ...] = (0, -1)
    """Layers never routed (negative counts from the end; default: the first and the last)."""

    ridge: float = 1e-3
    """Ridge penalty relative to the mean diagonal of the router inputs' second moment."""

    logit_scale: float = 2.0
    """Router logit per standard deviation of the predicted label (gradient scale in training)."""

    holdout_fraction: float = 0.25
    """Share of the windows held out of the fit (correlation, probes and plan checks)."""

    def __post_init__(self):
        checks = [
            ("target_compute", 0.0 < self.target_compute <= 1.0, "in (0, 1]"),
            ("start_compute", self.target_compute <= self.start_compute <= 1.0,
             "in [target_compute, 1]"),
            ("max_skip", 0.0 < self.max_skip < 1.0, "in (0, 1)"),
            ("min_skip", 0.0 <= self.min_skip <= self.max_skip, "in [0, max_skip]"),
            ("probe_skip", 0.0 < self.probe_skip < 1.0, "in (0, 1)"),
            ("allocation", self.allocation in ALLOCATIONS, " | ".join(ALLOCATIONS)),
            ("ridge", self.ridge > 0.0, "> 0"),
            ("logit_scale", self.logit_scale > 0.0, "> 0"),
            ("holdout_fraction", 0.0 < self.holdout_fraction < 1.0, "in (0, 1)"),
        ]  # fmt: skip
        for name, ok, allowed in checks:
            if not ok:
                flag = "--" + name.replace("_", "-")
                raise CalibrationError(f"{flag} {getattr(self, name)}: must be {allowed}")
        self.never_route = tuple(int(i) for i in self.never_route)


@dataclass
class CalibrationPlan:
    """What calibration measured and chose (stored in the checkpoint metadata).

    Attributes:
        num_layers: decoder layers of the model.
        routed_layers: layers given routers, ascending.
        layer_kept_targets: kept fraction per routed layer at ``target_compute``.
        layer_start_kept: kept fraction per routed layer in the written checkpoint.
        block_influence: per layer, ``1 - mean cos(h_in, h_out)`` on the fit windows.
        skip_loss_increase: per layer, held-out loss increase when the layer is removed.
        probe_loss_increase: per candidate layer, loss increase when its router skips
            ``probe_skip`` of the tokens (that layer only).
        router_correlation: per candidate layer, held-out correlation of the fitted router's
            prediction with the per-token label.
        target_compute, start_compute: the requested c_effs.
        c_eff_measured: c_eff of the plan at its budgets on the held-out windows.
        losses: held-out losses: ``base``, ``plan`` (routers at their budgets), ``plan_first_
            token_routable``, ``random_routing`` (same budgets), ``layer_removal`` (the lowest
            block-influence layers removed down to about the same c_eff) and ``start``.
        layer_removal: layers removed for the ``layer_removal`` loss.
        fit_tokens, heldout_tokens: tokens of the fit and held-out windows.
        seconds: wall time of the measurement.
    """

    num_layers: int
    routed_layers: list[int]
    layer_kept_targets: dict[int, float]
    layer_start_kept: dict[int, float]
    block_influence: list[float]
    skip_loss_increase: list[float]
    probe_loss_increase: dict[int, float]
    router_correlation: dict[int, float]
    target_compute: float
    start_compute: float
    c_eff_measured: float
    losses: dict[str, float] = field(default_factory=dict)
    layer_removal: list[int] = field(default_factory=list)
    fit_tokens: int = 0
    heldout_tokens: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """JSON-ready copy (layer keys as strings)."""
        out = asdict(self)
        for name in ("layer_kept_targets", "layer_start_kept", "probe_loss_increase",
                     "router_correlation"):  # fmt: skip
            out[name] = {str(k): v for k, v in out[name].items()}
        return out


# --------------------------------------------------------------------------- pure arithmetic


def fit_ridge(
    gram: torch.Tensor, moment: torch.Tensor, count: int, ridge: float
) -> tuple[torch.Tensor, float]:
    """Ridge regression ``y ~ x . w + b`` from accumulated statistics.

    Args:
        gram: ``[h + 1, h + 1]`` sum of ``[x, 1]^T [x, 1]`` (float64).
        moment: ``[h + 1]`` sum of ``[x, 1] * y``.
        count: number of samples.
        ridge: penalty relative to the mean diagonal of ``E[x x^T]`` (the bias is not penalised).

    Returns:
        ``(w [h], b)``.
    """
    dim = gram.shape[0] - 1
    scale = float(torch.diagonal(gram)[:dim].mean()) / max(count, 1)
    penalty = torch.zeros_like(gram)
    penalty.diagonal()[:dim] = ridge * max(scale, 1e-12) * count
    solution = torch.linalg.solve(gram + penalty, moment)
    return solution[:dim], float(solution[dim])


def concentrate_skips(
    costs: dict[int, float], total_skip: float, max_skip: float, min_skip: float
) -> dict[int, float]:
    """``max_skip`` in the cheapest layers first (ties: the later layer) until ``total_skip``.

    The last layer takes the remainder; a remainder under ``min_skip`` is dropped (the plan
    then computes slightly more than asked rather than route a layer for almost nothing).

    Raises:
        CalibrationError: the candidates cannot skip ``total_skip`` under ``max_skip``.
    """
    _check_feasible(len(costs), total_skip, max_skip)
    out: dict[int, float] = {}
    left = total_skip
    for j in sorted(costs, key=lambda j: (costs[j], -j)):
        if left <= 1e-12:
            break
        share = min(max_skip, left)
        if share >= min_skip:
            out[j] = share
        left -= share
    return out


def _check_feasible(candidates: int, total_skip: float, max_skip: float) -> None:
    if candidates * max_skip < total_skip - 1e-9:
        raise CalibrationError(
            f"the requested compute needs {total_skip:.3f} layer-equivalents skipped, but "
            f"{candidates} candidate layers at --max-skip {max_skip} skip at most "
            f"{candidates * max_skip:.3f}: raise --max-skip or --target-compute, or allow "
            f"more layers (--never-route)"
        )


def allocate_skips(
    costs: dict[int, float],
    total_skip: float,
    max_skip: float,
    min_skip: float,
) -> dict[int, float]:
    """Skipped fraction per layer minimising ``sum_j costs[j] * s_j^2`` at ``sum_j s_j = total``.

    The minimiser is ``s_j = min(max_skip, mu / costs[j])`` with ``mu`` found by bisection;
    layers whose share falls below ``min_skip`` get 0 and the rest is solved again, until stable.

    Args:
        costs: positive cost coefficient per candidate layer (its loss increase per unit of
            squared skip).
        total_skip: layer-equivalents to skip, ``num_layers * (1 - c_eff)``.
        max_skip: cap of one layer's skipped fraction.
        min_skip: smallest non-zero share.

    Returns:
        ``{layer: s_j}`` for the layers that skip anything (``s_j > 0``).

    Raises:
        CalibrationError: the candidates cannot skip ``total_skip`` under ``max_skip``.
    """
    if total_skip <= 0:
        return {}
    active = {j: max(c, 1e-9) for j, c in costs.items()}
    _check_feasible(len(active), total_skip, max_skip)
    while True:

        def shares(mu: float) -> dict[int, float]:
            return {j: min(max_skip, mu / c) for j, c in active.items()}

        low, high = 0.0, max(active.values()) * max_skip
        while sum(shares(high).values()) < total_skip:
            high *= 2.0
        for _ in range(200):
            mid = 0.5 * (low + high)
            if sum(shares(mid).values()) < total_skip:
                low = mid
            else:
                high = mid
        result = shares(high)
        small = [j for j, s in result.items() if s < min_skip]
        if not small or len(small) == len(active):
            return result
        for j in small:
            del active[j]


def _cut(values: torch.Tensor, skip: float) -> float:
    """A cut ``t`` with ``values < t`` for ``round(skip * n)`` of the ``n`` values.

    Midway between two neighbouring sorted values, so that rounding of the cut (to a gate and
    back) does not move a token across it. ``-inf`` skips nothing.
    """
    n = values.numel()
    k = min(n, max(0, round(skip * n)))
    if k == 0:
        return -math.inf
    ordered = torch.sort(values.double().flatten()).values
    if k == n:
        return float(ordered[-1]) + 1.0
    return 0.5 * (float(ordered[k - 1]) + float(ordered[k]))


# --------------------------------------------------------------------------- the model


def _normalised_layers(indices: Iterable[int], num_layers: int) -> set[int]:
    out = set()
    for i in indices:
        j = i + num_layers if i < 0 else i
        if not 0 <= j < num_layers:
            raise CalibrationError(
                f"--never-route {i}: no such layer (the model has {num_layers} layers)"
            )
        out.add(j)
    return out


def _load_mod_model(model_dir: Path, candidates: Sequence[int], mod: MoDConfig, device, dtype):
    """The source weights in a ``LlamaModForCausalLM`` routing ``candidates`` (keep-all)."""
    from megatron_mod.hf.configuration_llama_mod import LlamaModConfig
    from megatron_mod.hf.io import HFCheckpointReader, read_json
    from megatron_mod.hf.modeling_llama_mod import LlamaModForCausalLM

    source = read_json(model_dir / "config.json")
    dropped = ("architectures", "model_type", "auto_map", "_name_or_path")
    settings = {k: v for k, v in source.items() if k not in dropped}
    if source.get("model_type") == "qwen2":
        settings["attention_qkv_bias"] = True
    config = LlamaModConfig(
        **settings,
        mod_routing="threshold",
        mod_threshold=0.0,  # keep every token until a probe sets a layer's threshold
        mod_gate="straight_through",  # forward value exactly the layer's: measurements are exact
        mod_routed_layers=list(candidates),
        mod_router_input=mod.router_input,
        mod_keep_first_token=mod.keep_first_token,
        mod_skipped_kv=mod.skipped_kv,  # probes and thresholds measured in the K/V mode used
    )
    model = LlamaModForCausalLM(config)
    reader = HFCheckpointReader(model_dir)
    names = [n for n in reader.names() if ".router." not in n]
    state = reader.get(names)
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = {n for n in missing if ".router." in n}
    if config.tie_word_embeddings:
        allowed_missing.add("lm_head.weight")
    rotary = {n for n in unexpected if "rotary_emb" in n}
    if set(missing) - allowed_missing or set(unexpected) - rotary:
        raise CalibrationError(
            f"--model {model_dir}: weights do not match a LLaMA-family layout (missing "
            f"{sorted(set(missing) - allowed_missing)[:5]}, unexpected "
            f"{sorted(set(unexpected) - rotary)[:5]})"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(device=device, dtype=dtype).eval()


def _set_thresholds(model, thresholds: dict[int, float], keep_first_token: bool) -> None:
    """Per-layer gate thresholds of the calibration model (other routed layers keep all)."""
    for config in {id(c): c for c in (model.config, model.model.config)}.values():
        config.mod_layer_thresholds = {str(k): float(v) for k, v in thresholds.items()}
        config.mod_keep_first_token = keep_first_token
        config.validate_mod()


def _sigmoid(x: float) -> float:
    if x == math.inf:
        return 1.0
    if x == -math.inf:
        return 0.0
    return 1.0 / (1.0 + math.exp(-x))


@torch.inference_mode()
def _heldout_loss(model, windows: torch.Tensor, batch_size: int) -> tuple[float, dict[int, float]]:
    """Mean next-token loss on ``windows`` and each routed layer's kept fraction."""
    total, count = 0.0, 0
    kept: dict[int, list[int]] = {}
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size].to(model.device)
        out = model(input_ids=ids, labels=ids, use_cache=False, output_router_stats=True)
        n = ids.shape[0] * (ids.shape[1] - 1)
        total += float(out.loss) * n
        count += n
        for layer, s in out.router_stats.items():
            acc = kept.setdefault(layer, [0, 0])
            acc[0] += s["kept_tokens"]
            acc[1] += s["tokens"]
    return total / count, {j: k / max(t, 1) for j, (k, t) in kept.items()}


class _LayerStatistics:
    """Forward hooks on every decoder layer: block influence, labels and the ridge sums."""

    def __init__(self, model, candidates: Sequence[int], router_input: str, skip_first: bool):
        self.model = model
        self.layers = model.model.layers
        self.candidates = list(candidates)
        self.router_input = router_input
        self.skip_first = skip_first
        self.eps = model.config.rms_norm_eps
        hidden = model.config.hidden_size
        n = len(self.layers)
        self.cos_sum = torch.zeros(n, dtype=torch.float64)
        self.tokens = 0
        self.gram = {j: torch.zeros(hidden + 1, hidden + 1, dtype=torch.float64)
                     for j in self.candidates}  # fmt: skip
        self.moment = {j: torch.zeros(hidden + 1, dtype=torch.float64) for j in self.candidates}
        self.count = dict.fromkeys(self.candidates, 0)
        self.routers: dict[int, tuple[torch.Tensor, float]] | None = None
        self.predicted: dict[int, list[torch.Tensor]] = {j: [] for j in self.candidates}
        self.labels: dict[int, list[torch.Tensor]] = {j: [] for j in self.candidates}
        self._inputs: dict[int, torch.Tensor] = {}
        self._handles = []

    def router_features(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.float()
        if self.router_input == "rms_normed":
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x

    def __enter__(self):
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self._handles.append(layer.register_forward_hook(self._post(i), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _pre(self, index):
        def hook(_module, args, kwargs):
            self._inputs[index] = args[0] if args else kwargs["hidden_states"]

        return hook

    def _post(self, index):
        def hook(_module, _args, _kwargs, output):
            inp = self._inputs.pop(index)
            out = output[0] if isinstance(output, tuple) else output
            self.cos_sum[index] += (
                torch.nn.functional.cosine_similarity(inp.double(), out.double(), dim=-1)
                .sum()
                .cpu()
            )
            if index not in self.gram:
                return
            x, y = inp, out
            if self.skip_first:
                x, y = x[:, 1:], y[:, 1:]
            update = (y.float() - x.float()).norm(dim=-1)
            label = torch.log(update.clamp_min(1e-12) / x.float().norm(dim=-1).clamp_min(1e-12))
            feats = self.router_features(x).reshape(-1, x.shape[-1]).double()
            label = label.reshape(-1).double()
            if self.routers is None:
                ones = torch.ones(feats.shape[0], 1, dtype=feats.dtype, device=feats.device)
                aug = torch.cat([feats, ones], dim=1)
                self.gram[index] += (aug.T @ aug).cpu()
                self.moment[index] += (aug.T @ label).cpu()
                self.count[index] += feats.shape[0]
            else:
                w, b = self.routers[index]
                self.predicted[index].append((feats @ w.to(feats)).cpu() + b)
                self.labels[index].append(label.cpu())

        return hook


def _run(model, windows: torch.Tensor, batch_size: int, progress=None) -> None:
    starts = list(range(0, windows.shape[0], batch_size))
    with torch.inference_mode():
        for start in progress(starts) if progress else starts:
            model(input_ids=windows[start : start + batch_size].to(model.device), use_cache=False)


def _router_outputs(
    model, windows: torch.Tensor, batch_size: int, layers: Sequence[int], skip_first: bool
) -> dict[int, torch.Tensor]:
    """The logits of ``layers``' routers over ``windows`` (position 0 left out if always kept)."""
    seen: dict[int, list[torch.Tensor]] = {j: [] for j in layers}

    def capture(j):
        def hook(_module, _args, output):
            seen[j].append((output[:, 1:] if skip_first else output).detach().flatten().cpu())

        return hook

    handles = [model.model.layers[j].router.register_forward_hook(capture(j)) for j in layers]
    try:
        _run(model, windows, batch_size)
    finally:
        for handle in handles:
            handle.remove()
    return {j: torch.cat(v) for j, v in seen.items()}


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom > 0 else 0.0


# --------------------------------------------------------------------------- the calibration


def calibrate_hf_llama(
    model_dir: str | os.PathLike,
    data: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: CalibrationSettings,
    mod_config: MoDConfig | None = None,
    seq_length: int = 512,
    num_sequences: int = 8,
    batch_size: int = 1,
    json_key: str = "text",
    tp: int = 1,
    pp: int = 1,
    dtype: str = "auto",
    device: str = "cpu",
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> CalibrationPlan:
    """Calibrate routers on an HF LLaMA-family model and write a megatron-mod checkpoint.

    Args:
        model_dir: HF model directory (safetensors/bin + config + tokenizer).
        data: JSONL/Parquet/text file of calibration text.
        out_dir: megatron-mod checkpoint directory to create.
        settings: targets and measurement settings.
        mod_config: routing settings of the checkpoint (default: ``MoDConfig(gate=
            "straight_through")``; the routed layers are chosen here and override its own).
            Threshold routing only.
        seq_length, num_sequences, batch_size: calibration windows.
        json_key: JSONL text field.
        tp, pp, dtype: as for :func:`~megatron_mod.hf.convert.convert_hf_to_megatron`.
        device: where the measurement runs (``cpu`` or ``cuda``).
        overwrite: replace a non-empty ``out_dir``.
        log: where progress lines go.
        progress: tqdm bars for the measuring passes.

    Returns:
        The :class:`CalibrationPlan` (also in the checkpoint's metadata ``source.calibration``).

    Raises:
        CalibrationError: bad input; nothing is written.
    """
    from transformers import AutoTokenizer

    from megatron_mod.hf.convert import convert_hf_to_megatron
    from megatron_mod.hf.io import check_output_dir, read_json
    from megatron_mod.hf.prune import PruneError, load_text_windows

    t0 = time.perf_counter()
    mod = mod_config if mod_config is not None else MoDConfig(gate="straight_through")
    if mod.routing != "threshold":
        raise CalibrationError("--mod-routing topk: calibration sets thresholds; use threshold")
    if not 0.0 < mod.threshold < 1.0:
        raise CalibrationError(f"--mod-threshold {mod.threshold}: must be strictly in (0, 1)")
    src, out = Path(model_dir), Path(out_dir)
    if not (src / "config.json").is_file():
        raise CalibrationError(f"--model {src}: no config.json (expected a Hugging Face model dir)")
    check_output_dir(out, overwrite, "--out-dir")
    if dtype not in _DTYPES:
        raise CalibrationError(f"--dtype {dtype}: choose one of {sorted(_DTYPES)}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as err:
        raise CalibrationError(f"--model {src}: no usable tokenizer there ({err})") from None
    try:
        windows = load_text_windows(data, tokenizer, seq_length, num_sequences, json_key)
    except PruneError as err:
        raise CalibrationError(str(err)) from None
    if windows.shape[0] < 2:
        raise CalibrationError(
            f"--data {data}: {windows.shape[0]} window of {seq_length} tokens; calibration "
            f"needs at least 2 (one to fit, one held out): pass more text or a smaller "
            f"--seq-length"
        )
    num_layers = int(read_json(src / "config.json")["num_hidden_layers"])
    excluded = _normalised_layers(settings.never_route, num_layers)
    candidates = [j for j in range(num_layers) if j not in excluded]
    if not candidates:
        raise CalibrationError(f"--never-route excludes all {num_layers} layers")
    model = _load_mod_model(src, candidates, mod, torch.device(device), _DTYPES[dtype])

    calibrator = _Calibrator(model, windows, candidates, mod, settings, batch_size, progress)
    fit_tokens, held_tokens = calibrator.fit.numel(), calibrator.hold.numel()
    log(f"calibration: {num_layers} layers, {len(candidates)} candidates, {fit_tokens} fit "
        f"tokens, {held_tokens} held-out tokens")  # fmt: skip
    calibrator.fit_routers()
    calibrator.probe_layers()
    log(f"  base held-out loss {calibrator.losses['base']:.4f}")
    calibrator.choose_budgets()
    log("  budgets: " + ", ".join(f"{j}:{k:.2f}" for j, k in calibrator.kept_targets.items()))
    calibrator.check_plan()
    plan = calibrator.plan(time.perf_counter() - t0)

    final = dataclasses.replace(
        mod,
        routed_layers=plan.routed_layers,
        layer_kept_targets=dict(plan.layer_kept_targets),
        layer_thresholds={},
    )
    summary = convert_hf_to_megatron(
        src, out, tp=tp, pp=pp, mod_config=final, dtype=dtype, overwrite=overwrite,
        progress=progress, router_weights=calibrator.checkpoint_routers(),
        provenance={"calibration": plan.to_dict(), "calibration_data": str(data)},
    )  # fmt: skip
    log(f"  wrote {out} ({summary.tensors} tensors)")
    return plan


_DTYPES = {"auto": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16,
           "fp16": torch.float16}  # fmt: skip


class _Calibrator:
    """The measurements of one calibration, step by step, on a keep-all MoD model.

    The model routes every candidate layer with a *calibration router* whose logit is the
    standardised predicted label, ``(x . w + b - mean) / std``, so a threshold is a cut in
    standard deviations and a layer's keep-all state is the threshold 0.
    """

    def __init__(self, model, windows, candidates, mod, settings, batch_size, progress):
        self.model = model
        self.windows = windows
        n_hold = min(
            windows.shape[0] - 1, max(1, round(windows.shape[0] * settings.holdout_fraction))
        )
        self.fit, self.hold = windows[:-n_hold], windows[-n_hold:]
        self.candidates = list(candidates)
        self.num_layers = len(model.model.layers)
        self.mod = mod
        self.settings = settings
        self.batch_size = batch_size
        self.progress = progress
        self.losses: dict[str, float] = {}

    def _bar(self, iterable, desc: str):
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, disable=not self.progress, leave=False)

    def _loss(self, thresholds: dict[int, float], keep_first_token: bool | None = None):
        keep_first = self.mod.keep_first_token if keep_first_token is None else keep_first_token
        _set_thresholds(self.model, thresholds, keep_first)
        try:
            return _heldout_loss(self.model, self.hold, self.batch_size)
        finally:
            _set_thresholds(self.model, {}, self.mod.keep_first_token)

    # -- 1, 2: statistics, ridge fit, held-out correlation

    def fit_routers(self) -> None:
        """Block influence and a ridge-fitted router per candidate; install calibration routers."""
        stats = _LayerStatistics(
            self.model, self.candidates, self.mod.router_input, self.mod.keep_first_token
        )
        with stats:
            _run(self.model, self.fit, self.batch_size, lambda it: self._bar(it, "fit"))
        self.block_influence = [1.0 - float(s) / self.fit.numel() for s in stats.cos_sum]
        s = self.settings
        self.routers = {j: fit_ridge(stats.gram[j], stats.moment[j], stats.count[j], s.ridge)
                        for j in self.candidates}  # fmt: skip
        stats.routers = self.routers
        with stats:  # held-out windows first: their labels give the correlation
            _run(self.model, self.hold, self.batch_size)
        self.correlation = {
            j: _correlation(torch.cat(stats.predicted[j]), torch.cat(stats.labels[j]))
            for j in self.candidates
        }
        with stats:
            _run(self.model, self.fit, self.batch_size)
        predictions = {j: torch.cat(stats.predicted[j]) for j in self.candidates}
        self.centre = {j: float(p.mean()) for j, p in predictions.items()}
        self.spread = {j: max(float(p.std()), 1e-6) for j, p in predictions.items()}
        self.standardised = {
            j: (predictions[j] - self.centre[j]) / self.spread[j] for j in self.candidates
        }
        for j in self.candidates:
            w, b = self.routers[j]
            router = self.model.model.layers[j].router
            router.weight.data.copy_((w / self.spread[j]).float()[None, :])
            router.bias.data.fill_((b - self.centre[j]) / self.spread[j])

    # -- 3: what each layer costs

    def probe_layers(self) -> None:
        """Held-out loss: base, each candidate removed, each candidate at the probe skip."""
        self.losses["base"] = base = self._loss({})[0]
        self.skip_increase = [math.nan] * self.num_layers  # never-routed layers: not probed
        self.probe_increase: dict[int, float] = {}
        probe = self.settings.probe_skip
        for j in self._bar(self.candidates, "layer probes"):
            self.skip_increase[j] = self._loss({j: 1.0}, keep_first_token=False)[0] - base
            cut = _cut(self.standardised[j], probe)
            self.probe_increase[j] = self._loss({j: _sigmoid(cut)})[0] - base

    # -- 4: budgets

    def choose_budgets(self) -> None:
        """Per-layer kept fractions at the target and at the start."""
        s = self.settings
        costs = {j: max(self.probe_increase[j], 0.0) / s.probe_skip**2 for j in self.candidates}
        # A layer whose probe did not raise the loss is nearly free, not free: a tiny cost.
        floor = max(max(costs.values()) * 1e-3, 1e-9)
        costs = {j: max(c, floor) for j, c in costs.items()}
        total_skip = self.num_layers * (1.0 - s.target_compute)
        allocate = concentrate_skips if s.allocation == "concentrated" else allocate_skips
        skips = allocate(costs, total_skip, s.max_skip, s.min_skip)
        routed = sorted(skips) if skips else self.candidates[:1]
        self.kept_targets = {j: 1.0 - skips.get(j, 0.0) for j in routed}
        ratio = (1.0 - s.start_compute) / max(1.0 - s.target_compute, 1e-12)
        self.start_kept = {j: 1.0 - skips.get(j, 0.0) * ratio for j in routed}

    def place(self, kept: dict[int, float]) -> dict[int, float]:
        """Cuts (standardised logits) that keep ``kept`` of every window's tokens per layer.

        Each layer's cut is first the quantile of its keep-all predictions, then re-placed
        twice on the logits it sees with every layer routing at once (an upstream layer's
        skipping changes a later layer's input).
        """
        skips = {j: 1.0 - k for j, k in kept.items()}
        cuts = {j: _cut(self.standardised[j], s) for j, s in skips.items()}
        if all(s <= 0 for s in skips.values()):
            return cuts
        keep_first = self.mod.keep_first_token
        for _ in range(2):
            _set_thresholds(self.model, {j: _sigmoid(c) for j, c in cuts.items()}, keep_first)
            seen = _router_outputs(self.model, self.windows, self.batch_size, list(skips),
                                   keep_first)  # fmt: skip
            cuts = {j: _cut(seen[j], s) for j, s in skips.items()}
        _set_thresholds(self.model, {}, keep_first)
        return cuts

    # -- 5: the plan against its controls

    def check_plan(self) -> None:
        """Held-out losses of the plan, its first-token and random-routing controls, removal."""
        at_target = {j: _sigmoid(c) for j, c in self.place(self.kept_targets).items()}
        self.losses["plan"], kept = self._loss(at_target)
        routed = list(self.kept_targets)
        self.c_eff = (self.num_layers - len(routed) + sum(kept[j] for j in routed)) / (
            self.num_layers
        )
        self.losses["plan_first_token_routable"] = self._loss(at_target, False)[0]
        normal = torch.distributions.Normal(0.0, 1.0)
        random_cuts = {  # a standard-normal logit skips Phi(cut) of the tokens
            j: float(normal.icdf(torch.tensor(1.0 - k))) if k < 1 else -math.inf
            for j, k in self.kept_targets.items()
        }
        layers = self.model.model.layers
        handles = [layers[j].router.register_forward_hook(_random_logits(j)) for j in routed]
        try:
            self.losses["random_routing"] = self._loss(
                {j: _sigmoid(c) for j, c in random_cuts.items()}
            )[0]
        finally:
            for handle in handles:
                handle.remove()
        self.removal = _removal_layers(
            self.block_influence, self.candidates, self.c_eff, self.num_layers
        )
        self.losses["layer_removal"] = self._loss(dict.fromkeys(self.removal, 1.0), False)[0]
        self.start_cuts = self.place(self.start_kept)
        self.losses["start"] = self._loss({j: _sigmoid(c) for j, c in self.start_cuts.items()})[0]

    def plan(self, seconds: float) -> CalibrationPlan:
        """The record of what was measured and chosen."""
        routed = list(self.kept_targets)
        return CalibrationPlan(
            num_layers=self.num_layers,
            routed_layers=routed,
            layer_kept_targets={j: round(v, 6) for j, v in self.kept_targets.items()},
            layer_start_kept={j: round(v, 6) for j, v in self.start_kept.items()},
            block_influence=self.block_influence,
            skip_loss_increase=self.skip_increase,
            probe_loss_increase=self.probe_increase,
            router_correlation=self.correlation,
            target_compute=self.settings.target_compute,
            start_compute=self.settings.start_compute,
            c_eff_measured=self.c_eff,
            losses=dict(self.losses),
            layer_removal=self.removal,
            fit_tokens=int(self.fit.numel()),
            heldout_tokens=int(self.hold.numel()),
            seconds=seconds,
        )

    # -- 6: the checkpoint's routers

    def checkpoint_routers(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """``{layer: (weight, bias)}``: logit ``= scale * (standardised - cut) + logit(p)``.

        The global threshold p then keeps each layer's starting fraction; ``logit_scale`` sets
        how far (in logits) one standard deviation of the predicted label moves a token.
        """
        p_logit = gate_threshold_logit(self.mod.threshold)
        out = {}
        for j in self.kept_targets:
            w, b = self.routers[j]
            cut = self.start_cuts[j]
            if not math.isfinite(cut):  # keep everything seen in calibration, with a margin
                cut = float(self.standardised[j].min()) - 1.0
            scale = self.settings.logit_scale / self.spread[j]
            weight = (w * scale).float()[None, :]
            bias = scale * (b - self.centre[j]) - self.settings.logit_scale * cut + p_logit
            out[j] = (weight, torch.tensor([bias], dtype=torch.float32))
        return out


def _random_logits(seed: int):
    """A router forward hook returning standard-normal logits (the random-routing control)."""
    generator = torch.Generator().manual_seed(1000 + seed)

    def hook(_module, _args, output):
        noise = torch.randn(output.shape, generator=generator, dtype=torch.float32)
        return noise.to(output.device)

    return hook


def _removal_layers(
    block_influence: Sequence[float], candidates: Sequence[int], c_eff: float, num_layers: int
) -> list[int]:
    """The lowest block-influence candidates removed so that about ``c_eff`` of layers remain."""
    n_remove = max(0, min(len(candidates), round((1.0 - c_eff) * num_layers)))
    order = sorted(candidates, key=lambda j: (block_influence[j], -j))
    return sorted(order[:n_remove])
