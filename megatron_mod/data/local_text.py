"""Real English text and tokenizers built from files every machine already has.

Used by tests, the benchmark and the CPU example corpus, so nothing is downloaded: documents are
the docstrings of Python's standard library and the licence texts in
``/usr/share/common-licenses``; tokenizers are trained on them locally (a byte-level BPE saved as
a Hugging Face tokenizer directory, a sentencepiece unigram model).
"""

from __future__ import annotations

import ast
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

from megatron_mod.atomic import write_text_atomic

__all__ = [
    "licence_paragraphs",
    "local_english_documents",
    "stdlib_docstrings",
    "train_hf_bpe",
    "train_sentencepiece",
    "write_jsonl",
]


def stdlib_docstrings(min_chars: int = 200, limit: int | None = None) -> list[str]:
    """Docstrings (at least ``min_chars`` long) of the standard library, in path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    for path in sorted(root.rglob("*.py")):
        if {"test", "tests", "site-packages", "idle_test"} & set(path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars and doc not in texts[-1:]:
                    texts.append(doc)
                    if limit is not None and len(texts) >= limit:
                        return texts
    return texts


def licence_paragraphs(min_chars: int = 200) -> list[str]:
    """Paragraphs of the licence texts in /usr/share/common-licenses (empty if absent)."""
    root = Path("/usr/share/common-licenses")
    texts: list[str] = []
    if not root.is_dir():
        return texts
    for path in sorted(root.iterdir()):
        if path.is_file() and not path.is_symlink():
            body = path.read_text(encoding="utf-8", errors="replace")
            texts.extend(p.strip() for p in body.split("\n\n") if len(p.strip()) >= min_chars)
    return texts


def local_english_documents(min_chars: int = 200, limit: int | None = None) -> list[str]:
    """Licence paragraphs followed by standard-library docstrings."""
    texts = licence_paragraphs(min_chars) + stdlib_docstrings(min_chars)
    return texts[:limit] if limit is not None else texts


def write_jsonl(texts: Sequence[str], path: str | os.PathLike, key: str = "text") -> Path:
    """Write one ``{key: text}`` JSON object per line (whole or not at all)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps({key: text}) + "\n" for text in texts))
    return path


def _iter_texts(texts: Sequence[str]) -> Iterator[str]:
    yield from texts


def train_hf_bpe(texts: Sequence[str], out_dir: str | os.PathLike, vocab_size: int = 2048) -> Path:
    """Train a byte-level BPE and save it as a Hugging Face tokenizer directory.

    The tokenizer adds no special tokens when encoding and has ``<|endoftext|>`` as its EOS.

    Args:
        texts: training text.
        out_dir: directory to write (``tokenizer.json``, ``tokenizer_config.json``, …).
        vocab_size: target vocabulary size.

    Returns:
        ``out_dir`` as a Path.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_iter_texts(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>"
    )
    out_dir = Path(out_dir)
    fast.save_pretrained(str(out_dir))
    return out_dir


def train_sentencepiece(
    texts: Sequence[str], model_prefix: str | os.PathLike, vocab_size: int = 1000
) -> Path:
    """Train a small sentencepiece unigram model (with BOS/EOS pieces).

    Args:
        texts: training text.
        model_prefix: output path without ``.model``.
        vocab_size: vocabulary size.

    Returns:
        Path of the ``.model`` file.
    """
    import sentencepiece as spm

    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=_iter_texts([t.replace("\n", " ") for t in texts]),
        model_prefix=str(model_prefix),
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=3,
        minloglevel=2,
        num_threads=1,
    )
    return model_prefix.with_suffix(".model")
