"""Round trip: documents -> preprocess -> megatron-core's IndexedDataset reads back exactly what
the tokenizer, called directly, produces (HF and sentencepiece; with/without EOD; sentences)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_mod.data.local_text import write_jsonl
from megatron_mod.data.preprocess import PreprocessConfig, preprocess
from tests.helpers import data as dh


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.getbasetemp()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    texts = list(dh.english_texts())
    path = write_jsonl(texts, tmp_path_factory.mktemp("corpus") / "docs.jsonl")
    return texts, path


@pytest.fixture(scope="module")
def hf_reference(root):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(dh.hf_tokenizer_dir(root)), local_files_only=True)
    return tok, (lambda text: tok(text).input_ids), tok.eos_token_id


@pytest.fixture(scope="module")
def sp_reference(root):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(dh.sp_model(root)))
    return sp, (lambda text: sp.encode(text)), sp.eos_id()


def _reference_splitter():
    # An independent Punkt implementation (the package's own), same NLTK-trained English model.
    import punkt

    return punkt.PunktSentenceTokenizer(punkt.load_model("english")).tokenize


def _documents(ds: IndexedDataset):
    """Token list per document and per-document item lengths."""
    docs = []
    bounds = ds.document_indices
    for d in range(len(bounds) - 1):
        items = [ds[i] for i in range(bounds[d], bounds[d + 1])]
        docs.append((np.concatenate(items).tolist(), [len(x) for x in items]))
    return docs


@pytest.mark.parametrize("kind", ["hf", "sp"])
@pytest.mark.parametrize("append_eod", [False, True])
def test_documents_round_trip(kind, append_eod, corpus, root, hf_reference, sp_reference, tmp_path):
    texts, path = corpus
    model = dh.hf_tokenizer_dir(root) if kind == "hf" else dh.sp_model(root)
    _, encode, eod = hf_reference if kind == "hf" else sp_reference
    summary = preprocess(
        PreprocessConfig(
            input=str(path),
            output_prefix=str(tmp_path / "out"),
            tokenizer_type="HuggingFaceTokenizer" if kind == "hf" else "SentencePieceTokenizer",
            tokenizer_model=str(model),
            append_eod=append_eod,
            progress=False,
        )
    )
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    assert ds.index.dtype == np.uint16  # vocab < 65500
    docs = _documents(ds)
    assert len(docs) == len(texts) == summary.documents
    for text, (tokens, lengths) in zip(texts, docs):
        expected = list(encode(text)) + ([eod] if append_eod else [])
        assert tokens == expected
        assert lengths == [len(expected)]
    assert summary.total_tokens == sum(len(t) for t, _ in docs)
    assert summary.skipped == {}


@pytest.mark.parametrize("kind", ["hf", "sp"])
def test_sentence_split_round_trip(kind, corpus, root, hf_reference, sp_reference, tmp_path):
    texts, path = corpus
    model = dh.hf_tokenizer_dir(root) if kind == "hf" else dh.sp_model(root)
    _, encode, eod = hf_reference if kind == "hf" else sp_reference
    preprocess(
        PreprocessConfig(
            input=str(path),
            output_prefix=str(tmp_path / "out"),
            tokenizer_type="HuggingFaceTokenizer" if kind == "hf" else "SentencePieceTokenizer",
            tokenizer_model=str(model),
            append_eod=True,
            split_sentences=True,
            progress=False,
        )
    )
    split = _reference_splitter()
    ds = IndexedDataset(str(tmp_path / "out_text_sentence"))
    docs = _documents(ds)
    assert len(docs) == len(texts)
    multi = 0
    for text, (tokens, lengths) in zip(texts, docs):
        pieces = [ids for ids in (list(encode(s)) for s in split(text)) if ids]
        pieces[-1] = pieces[-1] + [eod]
        assert lengths == [len(p) for p in pieces]
        assert tokens == [t for p in pieces for t in p]
        multi += len(pieces) > 1
    # Real prose: most documents have several sentences, so splitting really happened.
    assert multi > len(texts) // 2
    # Abbreviations do not end sentences (Punkt, not a naive split on '. ').
    first = split(dh.EXTRA_TEXTS[0])
    assert first[0] == "Dr. Smith arrived at 3 p.m. on Jan. 5th."


def test_keep_newlines_sentences_rebuild_the_document(corpus, root, hf_reference, tmp_path):
    from megatron_mod.data.sentences import load_splitter

    texts, path = corpus
    plain, keeping = load_splitter("english"), load_splitter("english", keep_newlines=True)
    with_breaks = [t for t in texts if "\n\n" in t.strip()]
    assert len(with_breaks) > 5  # real prose with paragraph breaks
    newlines = {"text": 0, "kept": 0, "plain": 0}
    for text in texts:
        sentences = keeping.tokenize(text)
        # No text lost or reordered (boundaries may differ slightly from plain Punkt's).
        assert "".join("".join(sentences).split()) == "".join(text.split())
        newlines["text"] += text.strip().count("\n")
        newlines["kept"] += "".join(sentences).count("\n")
        newlines["plain"] += "".join(plain.tokenize(text)).count("\n")
    # The newlines between sentences survive (Punkt's boundary realignment after a closing
    # bracket still eats a few); plain Punkt drops them.
    assert newlines["kept"] >= 0.99 * newlines["text"] > newlines["plain"] + 100
    tok, encode, _ = hf_reference
    preprocess(
        PreprocessConfig(
            input=str(path),
            output_prefix=str(tmp_path / "out"),
            tokenizer_type="HuggingFaceTokenizer",
            tokenizer_model=str(dh.hf_tokenizer_dir(root)),
            split_sentences=True,
            keep_newlines=True,
            progress=False,
        )
    )
    docs = _documents(IndexedDataset(str(tmp_path / "out_text_sentence")))
    for text, (tokens, lengths) in zip(texts, docs):
        pieces = [ids for ids in (list(encode(s)) for s in keeping.tokenize(text)) if ids]
        assert tokens == [t for p in pieces for t in p]
        assert lengths == [len(p) for p in pieces]
    newline_ids = set(encode("a.\n\nB")) - set(encode("a. B"))
    assert newline_ids and any(newline_ids & set(t) for t, _ in docs)


def test_cli_multiple_keys_gz_and_parquet(root, hf_reference, tmp_path):
    """The CLI reads .jsonl.gz and .parquet, writes one dataset per key, and prints a summary."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = list(dh.english_texts())[:60]
    titles = [t.split("\n")[0][:60] for t in texts]
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        for title, text in zip(titles[:30], texts[:30]):
            f.write(json.dumps({"title": title, "text": text}) + "\n")
    table = pa.table({"title": titles[30:], "text": texts[30:], "other": list(range(30))})
    pq.write_table(table, tmp_path / "b.parquet", row_group_size=7)
    res = dh.run_preprocess(
        ["--input", tmp_path / "a.jsonl.gz", tmp_path / "b.parquet", "--json-keys", "text",
         "title", "--output-prefix", tmp_path / "out", "--tokenizer-type", "HuggingFaceTokenizer",
         "--tokenizer-model", dh.hf_tokenizer_dir(root), "--append-eod", "--workers", "2",
         "--summary-json", tmp_path / "summary.json"]
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "documents: 60" in res.stdout
    _, encode, eod = hf_reference
    for key, source in (("text", texts), ("title", titles)):
        docs = _documents(IndexedDataset(str(tmp_path / f"out_{key}_document")))
        assert [d for d, _ in docs] == [list(encode(t)) + [eod] for t in source]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["documents"] == 60 and summary["skipped"] == {}


def test_one_and_many_workers_byte_identical(corpus, root, tmp_path):
    _, path = corpus
    outputs = []
    for workers in (1, 2):
        prefix = tmp_path / f"w{workers}"
        preprocess(
            PreprocessConfig(
                input=str(path),
                output_prefix=str(prefix),
                tokenizer_type="HuggingFaceTokenizer",
                tokenizer_model=str(dh.hf_tokenizer_dir(root)),
                append_eod=True,
                split_sentences=True,
                workers=workers,
                chunk_size=7,  # many small chunks, so results really arrive from both workers
                progress=False,
            )
        )
        outputs.append(
            tuple(
                (tmp_path / f"w{workers}_text_sentence{ext}").read_bytes()
                for ext in (".bin", ".idx")
            )
        )
    assert outputs[0][0] == outputs[1][0]
    assert outputs[0][1] == outputs[1][1]
    assert len(outputs[0][0]) > 100_000


@pytest.fixture(scope="module")
def bos_tokenizer_dir(root):
    """The test BPE with a LLaMA-style post-processor: BOS ``<s>`` before every text."""
    from tokenizers import processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    base = AutoTokenizer.from_pretrained(str(dh.hf_tokenizer_dir(root)), local_files_only=True)
    backend = base.backend_tokenizer
    backend.add_special_tokens(["<s>"])
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="<|endoftext|>", pad_token="<pad>"
    )
    out = root / "hf_tokenizer_bos"
    tok.save_pretrained(str(out))
    return out


@pytest.mark.parametrize("special_tokens", [True, False])
def test_special_tokens_option(special_tokens, corpus, bos_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    texts, path = corpus
    texts, path = texts[:40], write_jsonl(texts[:40], tmp_path / "docs.jsonl")
    tok = AutoTokenizer.from_pretrained(str(bos_tokenizer_dir), local_files_only=True)
    bos, eod = tok.bos_token_id, tok.eos_token_id
    preprocess(
        PreprocessConfig(
            input=str(path),
            output_prefix=str(tmp_path / "out"),
            tokenizer_type="HuggingFaceTokenizer",
            tokenizer_model=str(bos_tokenizer_dir),
            special_tokens=special_tokens,
            append_eod=True,
            progress=False,
        )
    )
    docs = _documents(IndexedDataset(str(tmp_path / "out_text_document")))
    assert len(docs) == len(texts)
    for text, (tokens, _) in zip(texts, docs):
        plain = tok(text, add_special_tokens=False).input_ids
        if special_tokens:  # the default: the tokenizer's BOS leads every document
            assert tokens == [bos, *plain, eod] == tok(text).input_ids + [eod]
        else:
            assert tokens == [*plain, eod]
            assert bos not in tokens
