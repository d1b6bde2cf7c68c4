"""Load an exported MoD model with plain ``transformers`` and generate with the MoD KV cache.

Prints the generated text, the per-layer kept fractions on the prompt, and how the kept
fraction and the held-out loss move when the routing threshold p is changed at run time.

Usage: python examples/quickstart/generate.py --model work/quickstart/hf_mod --prompt "Return the"
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch


def held_out_texts(corpus: Path, count: int) -> list[str]:
    """The last ``count`` documents of a JSONL corpus (held out from every training stage)."""
    lines = corpus.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines[-count:]]


def evaluate(model, tokenizer, texts: list[str], max_len: int) -> tuple[float, dict[int, float]]:
    """Mean next-token loss and per-layer kept fractions over ``texts``."""
    total_loss, total_tokens, kept = 0.0, 0, {}
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_len]
        with torch.no_grad():
            out = model(input_ids=ids, labels=ids, output_router_stats=True)
        n = ids.shape[1] - 1
        total_loss += float(out.loss) * n
        total_tokens += n
        for layer, stats in out.router_stats.items():
            kept[layer] = kept.get(layer, 0.0) + stats["kept_fraction"] / len(texts)
    return total_loss / max(total_tokens, 1), kept


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="exported HF MoD model dir")
    p.add_argument("--prompt", default="Return the")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--corpus", help="JSONL corpus whose last documents are used for the p sweep")
    p.add_argument("--eval-docs", type=int, default=50)
    args = p.parse_args(argv)

    # The export's config.json names its remote model code; without the flag the tokenizer's
    # config lookup stops to ask on a terminal (transformers 5).
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True)
    model.eval()
    print(
        f"loaded {type(model).__name__} from {args.model}; routed layers "
        f"{model.config.mod_routed_layers}, threshold p = {model.config.mod_threshold}"
    )

    inputs = tokenizer([args.prompt], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            input_ids=inputs.input_ids,
            attention_mask=inputs.attention_mask,
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
        )
    print(f"\ngreedy continuation of {args.prompt!r}:\n{tokenizer.decode(out[0])}\n")

    if args.corpus:
        texts = held_out_texts(Path(args.corpus), args.eval_docs)
        print(f"p sweep on {len(texts)} held-out documents (p changed at run time):")
        print("| p | held-out loss | perplexity | mean kept fraction of routed layers |")
        print("|---:|---:|---:|---:|")
        for threshold in (0.0, 0.3, 0.5, 0.7):
            model.set_mod_threshold(threshold)
            loss, kept = evaluate(model, tokenizer, texts, max_len=256)
            mean_kept = sum(kept.values()) / max(len(kept), 1)
            print(f"| {threshold:.1f} | {loss:.3f} | {math.exp(loss):.1f} | {mean_kept:.3f} |")


if __name__ == "__main__":
    main()
