"""Measurements shared by every variant of the SmolLM2 comparison: held-out loss, c_eff, prefill.

Every variant is an ordinary Hugging Face directory (a ``llama_mod`` export, a dense
``LlamaForCausalLM`` export, or the untouched base), scored on the *same* token windows of two
text sources with one loss function, so the numbers differ only by the model.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def texts_of_jsonl(path: Path) -> list[str]:
    """The ``text`` field of every line of a JSONL file."""
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def other_source_texts() -> tuple[list[str], str]:
    """A second text source unlike the training docstrings: licence texts (Debian's
    /usr/share/common-licenses), else the topics of Python's own reference manual (pydoc).

    Returns:
        (documents in a fixed shuffled order, a name for the source)
    """
    from megatron_mod.data.local_text import licence_paragraphs

    docs = licence_paragraphs()
    name = "licence texts (/usr/share/common-licenses)"
    if len(docs) < 20:
        from pydoc_data.topics import topics

        docs = [t for _, t in sorted(topics.items()) if len(t) >= 200]
        name = "Python reference-manual topics (pydoc_data.topics)"
    # Shuffled once with a fixed seed, so the windows mix many licences rather than the first.
    random.Random(0).shuffle(docs)
    return docs, name


def token_windows(tokenizer, texts: list[str], seq_length: int, count: int) -> torch.Tensor:
    """``[n <= count, seq_length]`` windows of the texts joined by EOS (at least one window).

    Raises:
        ValueError: the texts hold less than one window of tokens.
    """
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if len(ids) >= seq_length * count:
            break
    n = min(count, len(ids) // seq_length)
    if n == 0:
        raise ValueError(f"{len(ids)} tokens of text, fewer than one window of {seq_length}")
    return torch.tensor(ids[: n * seq_length]).view(n, seq_length)


def load_model(path: Path, device: str = "cpu"):
    """An HF directory (stock LLaMA or ``llama_mod`` export) in fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)
    return model.to(device).eval()


def score(model, windows: torch.Tensor, base_layers: int, device: str = "cpu") -> dict:
    """Token-weighted next-token loss and c_eff of ``model`` on ``windows``.

    c_eff is the fraction of (token, layer) pairs computed, against the *base* model's layer
    count: a MoD model's routed layers count their kept fraction, a pruned model's missing
    layers count 0.

    ``routing`` says, per routed layer, whether it routes tokens or whole sequences: the share
    of windows in which it keeps some but not all tokens (``mixed_windows``), the spread of its
    per-window kept fraction (``window_kept_std``), and ``differs_between_sequences``: the
    fraction of (window, position) decisions that differ from the layer's majority decision at
    that position over all windows (0 for a layer that routes by position or not at all).

    Returns:
        {"loss", "perplexity", "c_eff", "kept" and "routing" (per routed layer; MoD models
        only), "tokens"}
    """
    mod = getattr(model.config, "model_type", "") == "llama_mod"
    routed = list(model.config.mod_routed_layers) if mod else []
    kept = dict.fromkeys(routed, 0)
    decisions = {i: [] for i in routed}
    nll, count, tokens = 0.0, 0, 0
    with torch.inference_mode():
        for row in windows:
            ids = row[None].to(device)
            extra = {"output_router_stats": True} if mod else {}
            out = model(input_ids=ids, use_cache=False, **extra)
            logits = out.logits[0, :-1].float()
            nll += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
            tokens += ids.shape[1]
            for i in routed:
                kept[i] += int(out.router_stats[i]["kept_tokens"])
                decisions[i].append(out.router_stats[i]["keep"][0].cpu())
    num_layers = model.config.num_hidden_layers
    computed = num_layers - len(routed) + sum(k / tokens for k in kept.values())
    loss = nll / count
    result = {
        "loss": round(loss, 5),
        "perplexity": round(math.exp(min(loss, 700.0)), 3),
        "c_eff": round(computed / base_layers, 5),
        "kept": {str(i): round(k / tokens, 4) for i, k in kept.items()},
        "tokens": count,
    }
    if routed:
        result["routing"] = {str(i): routing_spread(torch.stack(decisions[i])) for i in routed}
    return result


def routing_spread(keep: torch.Tensor) -> dict:
    """How one layer's decisions ``keep`` [windows, positions] vary within and across windows."""
    per_window = keep.float().mean(dim=1)
    majority = keep.float().mean(dim=0) >= 0.5
    return {
        "mixed_windows": round(float(((per_window > 0) & (per_window < 1)).float().mean()), 4),
        "window_kept_std": round(float(per_window.std()) if len(per_window) > 1 else 0.0, 4),
        "differs_between_sequences": round(float((keep != majority[None]).float().mean()), 4),
    }


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def prefill_seconds(model, ids: torch.Tensor, device: str = "cpu") -> float:
    """Wall time of one prefill (``use_cache=True``, last logits only, as ``generate()`` does)."""
    with torch.inference_mode():
        _sync(device)
        start = time.perf_counter()
        model(input_ids=ids, use_cache=True, logits_to_keep=1)
        _sync(device)
        return time.perf_counter() - start


def time_prefill(models: dict, ids: torch.Tensor, rounds: int, device: str = "cpu") -> dict:
    """Median prefill seconds per model, rounds interleaved (each round visits every model, in
    alternating order) so that load on the machine hits all of them alike.

    Returns:
        {name: {"prefill_s", "prefill_tokens_per_s", "rounds"}}
    """
    ids = ids.to(device)
    for model in models.values():  # warm-up: allocator, kernels, lazy init
        prefill_seconds(model, ids, device)
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for rnd in range(rounds):
        for name in names if rnd % 2 == 0 else names[::-1]:
            times[name].append(prefill_seconds(models[name], ids, device))
    return {
        name: {
            "prefill_s": round(statistics.median(t), 5),
            "prefill_tokens_per_s": round(ids.numel() / statistics.median(t), 1),
            "rounds": len(t),
        }
        for name, t in times.items()
    }
