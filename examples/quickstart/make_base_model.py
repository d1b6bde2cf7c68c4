"""Make the quick-start's inputs: a small English corpus, a tokenizer and a tiny pretrained LLaMA.

Everything comes from files that ship with Python, so nothing is downloaded:

* corpus: the docstrings of the standard library (modules, classes, functions), one JSON line
  per docstring (``{"text": ...}``): ``OUT/corpus/train.jsonl`` and, for evaluation,
  ``OUT/corpus/heldout.jsonl`` (the last ``--heldout-docs`` docstrings, never trained on);
* tokenizer: a byte-level BPE trained on that corpus with the ``tokenizers`` library, saved as a
  Hugging Face tokenizer;
* base model: a random-init ``transformers.LlamaForCausalLM`` (GQA) pretrained for a few hundred
  steps on the corpus with plain PyTorch, saved with ``save_pretrained`` (safetensors) in
  ``OUT/base``. It stands in for the pretrained LLaMA that megatron-mod converts.

Usage: python examples/quickstart/make_base_model.py --out work [--steps 300]
"""

from __future__ import annotations

import argparse
import ast
import math
import sysconfig
import time
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_mod.data.local_text import write_jsonl


def stdlib_docstrings(min_chars: int = 200) -> list[str]:
    """Docstrings (at least ``min_chars`` long) of every standard-library module, in path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(root.rglob("*.py")):
        if "test" in path.parts or "site-packages" in path.parts or "idle_test" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [tree] + [
            n
            for n in ast.walk(tree)
            if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        ]
        for node in nodes:
            doc = ast.get_docstring(node)
            if doc and len(doc) >= min_chars:
                texts.append(doc)
    if not texts:
        raise FileNotFoundError(f"no docstrings found under {root}")
    return texts


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    """Byte-level BPE with LLaMA's special tokens, saved as a HF ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_input_names=["input_ids", "attention_mask"],  # LLaMA takes no token_type_ids
    )
    hf_tok.save_pretrained(out_dir)
    return hf_tok


def pretrain_base(model, token_stream: torch.Tensor, steps: int, seq: int, batch: int, lr: float):
    """A few hundred AdamW steps of next-token prediction on random windows of the corpus."""
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))),
    )
    model.train()
    # disable=None: no bar when stderr is not a terminal (a redirected log stays readable).
    bar = tqdm(range(steps), desc="pretrain base", unit="step", disable=None)
    for _ in bar:
        starts = torch.randint(0, token_stream.numel() - seq - 1, (batch,), generator=gen)
        windows = torch.stack([token_stream[s : s + seq + 1] for s in starts.tolist()])
        loss = model(input_ids=windows[:, :-1], labels=windows[:, :-1]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return float(loss.detach())


def main(argv: list[str] | None = None) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="work directory (corpus/, base/ are created)")
    p.add_argument("--steps", type=int, default=300, help="base-model pretraining steps")
    p.add_argument("--vocab-size", type=int, default=2000, help="BPE vocabulary size")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--heldout-docs", type=int, default=100, help="docstrings kept for evaluation")
    args = p.parse_args(argv)

    start = time.perf_counter()
    torch.manual_seed(0)
    out = Path(args.out)
    base = out / "base"
    texts = stdlib_docstrings()
    texts, heldout = texts[: -args.heldout_docs], texts[-args.heldout_docs :]
    corpus = out / "corpus" / "train.jsonl"
    write_jsonl(texts, corpus)
    write_jsonl(heldout, out / "corpus" / "heldout.jsonl")
    tokenizer = train_tokenizer(texts, args.vocab_size, base)
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    stream = torch.tensor([t for doc in ids for t in [*doc, tokenizer.eos_token_id]])

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=int(args.hidden_size * 8 / 3) // 16 * 16,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    loss = pretrain_base(model, stream, args.steps, args.seq_length, args.batch_size, args.lr)
    model.save_pretrained(base, safe_serialization=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"corpus: {len(texts)} training + {len(heldout)} held-out docstrings -> {corpus.parent}\n"
        f"base model: LlamaForCausalLM, {args.layers} layers, hidden {args.hidden_size}, "
        f"8 heads / 2 KV heads, vocab {len(tokenizer)}, {n_params / 1e6:.2f}M parameters, "
        f"final training loss {loss:.3f} -> {base} ({time.perf_counter() - start:.0f} s)",
        flush=True,
    )


if __name__ == "__main__":
    main()
