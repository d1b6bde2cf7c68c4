"""Documents of one local file, as text or as a token stream, for tools that score a model.

Layer pruning (``tools/prune_layers.py``) and the threshold sweep (``tools/sweep_threshold.py``)
both read held-out text from a file the user names: JSONL (also gzipped) or Parquet records with
the text under one key, or a plain text file taken whole. Records are read through
:mod:`megatron_mod.data.readers`, so the file is streamed and a bad record is reported with its
file and line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

from megatron_mod.data.readers import SUPPORTED_SUFFIXES, Problem, iter_raw_records
from megatron_mod.errors import MegatronModError

__all__ = ["DocumentError", "iter_document_texts", "read_token_stream"]


class DocumentError(MegatronModError, ValueError):
    """A document file that cannot be read as asked; the message names the file and line."""


def iter_document_texts(path: str | os.PathLike, key: str = "text") -> Iterator[str]:
    """The non-blank documents of ``path``, in file order.

    Args:
        path: a JSONL / JSONL.gz / Parquet file (one document per record) or any other file,
            read whole as one UTF-8 document.
        key: the record field holding the text.

    Raises:
        DocumentError: a record is not valid JSON or has no string under ``key``, or the file
            is unreadable (``file:line`` in the message).
    """
    path = os.fspath(path)
    if not path.endswith(SUPPORTED_SUFFIXES):
        with open(path, encoding="utf-8", errors="strict") as f:
            text = f.read()
        if text.strip():
            yield text
        return
    for rec in iter_raw_records([path], columns=(key,)):
        if isinstance(rec, Problem):
            raise DocumentError(f"{rec.file}:{rec.line}: {rec.reason}: {rec.detail}")
        record = rec.payload
        if not isinstance(record, dict):
            if not record.strip():
                continue
            try:
                record = json.loads(record)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DocumentError(f"{rec.file}:{rec.line}: not valid JSON ({e})") from None
        text = record.get(key) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise DocumentError(
                f"{rec.file}:{rec.line}: no string under key {key!r} (pass --json-key with the "
                "record's text field)"
            )
        if text.strip():
            yield text


def read_token_stream(
    path: str | os.PathLike, tokenizer, max_tokens: int, key: str = "text"
) -> list[int]:
    """Token ids of ``path``'s documents, each followed by EOS, up to about ``max_tokens``.

    Reading stops at the first document that reaches ``max_tokens`` (the list may be longer, or
    shorter when the file runs out).

    Args:
        path: see :func:`iter_document_texts`.
        tokenizer: a Hugging Face tokenizer (no special tokens are added; its EOS separates
            documents when it has one).
        max_tokens: how many tokens the caller needs.
        key: the record field holding the text.
    """
    eos = tokenizer.eos_token_id
    tokens: list[int] = []
    for text in iter_document_texts(path, key):
        tokens.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            tokens.append(eos)
        if len(tokens) >= max_tokens:
            break
    return tokens
