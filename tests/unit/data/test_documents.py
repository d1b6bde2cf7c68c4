"""Held-out documents read by the pruning and sweep tools (megatron_mod.data.documents)."""

from __future__ import annotations

import gzip
import json

import pytest

from megatron_mod.data.documents import DocumentError, iter_document_texts, read_token_stream


class CharTokenizer:
    """One token per character; EOS 0."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        assert not add_special_tokens
        return {"input_ids": [ord(c) for c in text]}


def test_jsonl_gzip_and_plain_text(tmp_path):
    records = [{"text": "first"}, {"text": "   "}, {"text": "second", "id": 2}]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    assert list(iter_document_texts(jsonl)) == ["first", "second"]  # blank ones dropped
    gz = tmp_path / "a.jsonl.gz"
    gz.write_bytes(gzip.compress(jsonl.read_bytes()))
    assert list(iter_document_texts(gz)) == ["first", "second"]
    plain = tmp_path / "a.txt"
    plain.write_text("one document\n\nwith two paragraphs\n")
    assert list(iter_document_texts(plain)) == [plain.read_text()]


def test_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DocumentError, match=r"bad\.jsonl:2: not valid JSON"):
        list(iter_document_texts(bad))
    wrong_key = tmp_path / "key.jsonl"
    wrong_key.write_text('{"content": "ok"}\n')
    message = r"key\.jsonl:1: no string under key 'text'.*--json-key"
    with pytest.raises(DocumentError, match=message):
        list(iter_document_texts(wrong_key))
    assert list(iter_document_texts(wrong_key, key="content")) == ["ok"]


def test_token_stream_separates_documents_and_stops_early(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("ab", "cde", "fghij")))
    tokens = read_token_stream(path, CharTokenizer(), max_tokens=5)
    # "ab" EOS "cde" EOS reaches 5 tokens: the third document is not read.
    assert tokens == [ord("a"), ord("b"), 0, ord("c"), ord("d"), ord("e"), 0]
    everything = read_token_stream(path, CharTokenizer(), max_tokens=10**6)
    assert len(everything) == 2 + 3 + 5 + 3
