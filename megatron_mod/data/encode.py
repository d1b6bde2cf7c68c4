"""Worker side of preprocessing: raw records -> token ids, or a reason for skipping them.

A worker receives chunks of raw records (JSONL lines as bytes, Parquet rows as dicts), parses
and validates them, optionally splits sentences, tokenizes all texts of the chunk in one batched
call, and returns per record either the token arrays for every JSON key or a skip reason. The
token layout follows Megatron-LM's ``tools/preprocess_data.py``: empty sentences are dropped, the
EOD token is appended to the last sentence of a document.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "SKIP_REASONS",
    "EncodeOptions",
    "Encoder",
    "encode_chunk",
    "init_worker",
]

# Every reason a record can be skipped for, in report order. ``filtered_*`` are corpus filters,
# not errors: they never fail a run.
SKIP_REASONS = (
    "invalid_utf8",
    "malformed_json",
    "not_an_object",
    "missing_key",
    "non_string",
    "empty_line",
    "empty_document",
    "tokenizer_error",
    "truncated_gzip",
    "corrupt_gzip",
    "unreadable_parquet",
)
FILTER_REASONS = ("filtered_min_chars", "filtered_language")


@dataclass(frozen=True)
class EncodeOptions:
    """What a worker needs to turn records into tokens."""

    json_keys: tuple[str, ...]
    """Record fields to tokenize; each gets its own output dataset."""
    tokenizer_type: str
    """``HuggingFaceTokenizer`` or ``SentencePieceTokenizer``."""
    tokenizer_model: str
    """Local tokenizer directory or sentencepiece model file."""
    dtype: str
    """numpy dtype name of the output tokens (from the vocabulary size)."""
    special_tokens: bool = True
    """Let a Hugging Face tokenizer add its special tokens (LLaMA: BOS); False: none."""
    append_eod: bool = False
    """Append the tokenizer's EOD id to each document."""
    split_sentences: bool = False
    """Split each document into sentences with Punkt (one index item per sentence)."""
    lang: str = "english"
    """Punkt model used for sentence splitting."""
    keep_newlines: bool = False
    """With sentence splitting, keep the whitespace (newlines) that follows each sentence."""
    min_chars: int = 0
    """Skip records whose texts (all keys together) are shorter than this (filter)."""
    language_key: str | None = None
    """Dotted path of a record field holding its language, for the language filter."""
    languages: tuple[str, ...] = ()
    """Keep only records whose ``language_key`` value is one of these (empty: no filter)."""


def _lookup(record: dict, dotted: str):
    value = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


class Encoder:
    """Parses, filters, splits and tokenizes chunks of raw records."""

    def __init__(self, options: EncodeOptions):
        from megatron_mod.data.tokenizers import build_tokenizer

        self.options = options
        self.tokenizer = build_tokenizer(
            options.tokenizer_type, options.tokenizer_model, special_tokens=options.special_tokens
        )
        self.splitter = None
        if options.split_sentences:
            from megatron_mod.data.sentences import load_splitter

            self.splitter = load_splitter(options.lang, keep_newlines=options.keep_newlines)
        self.dtype = np.dtype(options.dtype)

    def _parse(self, payload) -> tuple[str, str, dict | None]:
        """(reason, detail, record); reason is empty when the record is usable."""
        if isinstance(payload, dict):
            return "", "", payload
        if not payload.strip():
            return "empty_line", "blank line", None
        try:
            line = payload.decode("utf-8")
        except UnicodeDecodeError as e:
            return "invalid_utf8", f"byte {e.start}: {e.reason}", None
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            return "malformed_json", f"{e.msg} (column {e.colno})", None
        if not isinstance(record, dict):
            return "not_an_object", f"JSON {type(record).__name__}, expected an object", None
        return "", "", record

    def _texts(self, record: dict) -> tuple[str, str, list[str] | None]:
        texts = []
        for key in self.options.json_keys:
            if key not in record or record[key] is None:
                return "missing_key", f"no key {key!r}", None
            value = record[key]
            if not isinstance(value, str):
                return "non_string", f"key {key!r} holds {type(value).__name__}", None
            if not value.strip():
                return "empty_document", f"key {key!r} is empty", None
            texts.append(value)
        opts = self.options
        if opts.min_chars and sum(len(t) for t in texts) < opts.min_chars:
            return "filtered_min_chars", "", None
        if opts.languages:
            lang = _lookup(record, opts.language_key or "language")
            if lang not in opts.languages:
                return "filtered_language", "", None
        return "", "", texts

    def encode_chunk(self, chunk: Sequence[tuple]) -> list[tuple]:
        """Encode one chunk.

        Args:
            chunk: items ``(file_index, line, payload)`` for records, or
                ``(file_index, line, None, reason, detail)`` for read problems.

        Returns:
            One result per item: ``("ok", text_bytes, [(tokens, lengths) per key])`` or
            ``("skip", file_index, line, reason, detail)``.
        """
        results: list = [None] * len(chunk)
        pending = []  # (item index, [sentences per key])
        flat: list[str] = []
        for i, item in enumerate(chunk):
            file_index, line, payload = item[:3]
            if payload is None:
                results[i] = ("skip", file_index, line, item[3], item[4])
                continue
            reason, detail, record = self._parse(payload)
            texts = None
            if not reason:
                reason, detail, texts = self._texts(record)
            if reason:
                results[i] = ("skip", file_index, line, reason, detail)
                continue
            per_key = []
            for text in texts:
                sentences = self.splitter.tokenize(text) if self.splitter else [text]
                per_key.append((len(flat), len(sentences)))
                flat.extend(sentences)
            pending.append((i, per_key, sum(len(t.encode("utf-8")) for t in texts)))
        try:
            encoded = self.tokenizer.encode_batch(flat)
        except Exception:  # noqa: BLE001 - fall back per record to locate the bad one
            encoded = None
        for i, per_key, nbytes in pending:
            file_index, line = chunk[i][:2]
            docs = []
            for start, count in per_key:
                if encoded is not None:
                    pieces = encoded[start : start + count]
                else:
                    try:
                        pieces = self.tokenizer.encode_batch(flat[start : start + count])
                    except Exception as e:  # noqa: BLE001 - reported with file:line
                        docs = None
                        results[i] = ("skip", file_index, line, "tokenizer_error", repr(e)[:200])
                        break
                ids: list[int] = []
                lengths: list[int] = []
                for sentence_ids in pieces:
                    if sentence_ids:
                        ids.extend(sentence_ids)
                        lengths.append(len(sentence_ids))
                if ids and self.options.append_eod:
                    ids.append(self.tokenizer.eod)
                    lengths[-1] += 1
                if not ids:
                    docs = None
                    results[i] = ("skip", file_index, line, "empty_document", "no tokens")
                    break
                docs.append((np.asarray(ids, dtype=self.dtype), lengths))
            if docs is not None:
                results[i] = ("ok", nbytes, docs)
        return results


_ENCODER: Encoder | None = None


def init_worker(options: EncodeOptions) -> None:
    """Pool initializer: build the tokenizer (and splitter) once per worker process."""
    global _ENCODER
    # One worker = one core: the Rust tokenizer's own thread pool would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _ENCODER = Encoder(options)


def encode_chunk(chunk: Sequence[tuple]) -> list[tuple]:
    """Pool task: encode ``chunk`` with this worker's :class:`Encoder`."""
    assert _ENCODER is not None, "init_worker was not called in this process"
    return _ENCODER.encode_chunk(chunk)
