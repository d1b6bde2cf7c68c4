"""prepare_corpus: config errors name file and key; up-to-date sources are skipped; the blend
files hold the normalised weights and the written prefixes."""

from __future__ import annotations

import importlib.util
import json
import os
import textwrap
from pathlib import Path

import pytest
import yaml
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_mod.data.corpus import ConfigError, load_corpus_config, prepare_corpus
from megatron_mod.data.datasets import parse_blend, read_data_args_file
from megatron_mod.data.local_text import write_jsonl
from tests.helpers import data as dh
from tests.helpers.subprocess_utils import REPO


def _config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "corpus.yaml"
    path.write_text(textwrap.dedent(body))
    return path


BASE = """
tokenizer: {type: HuggingFaceTokenizer, model: tok}
sources:
  - {name: a, inputs: [a.jsonl], weight: 1}
"""


@pytest.mark.parametrize(
    "body, key",
    [
        (BASE.replace("weight: 1", "weight: -2"), "sources[0].weight"),
        (BASE.replace("weight: 1", "weight: lots"), "sources[0].weight"),
        (BASE.replace(", weight: 1", ""), "sources[0].weight"),
        (BASE.replace("weight: 1", "weight: 1, colour: red"), "sources[0].colour"),
        (BASE.replace("inputs: [a.jsonl]", "inputs: []"), "sources[0].inputs"),
        (BASE.replace("name: a", "name: 'a b'"), "sources[0].name"),
        (BASE.replace("weight: 1}", "weight: 1, filters: {min_chars: -1}}"),
         "sources[0].filters.min_chars"),
        (BASE.replace("weight: 1}", "weight: 1, filters: {language: 3}}"),
         "sources[0].filters.language"),
        (BASE.replace("HuggingFaceTokenizer", "GPT2BPETokenizer"), "tokenizer.type"),
        (BASE.replace("model: tok}", "model: tok, special_tokens: maybe}"),
         "tokenizer.special_tokens"),
        (BASE + "workers: 0\n", "workers"),
        (BASE + "on_error: ignore\n", "on_error"),
        (BASE + "output: x\n", "output"),
        (BASE + "  - {name: a, inputs: [b.jsonl], weight: 1}\n", "sources"),
        ("sources: []\n", "tokenizer"),
    ],
)  # fmt: skip
def test_config_errors_name_file_and_key(tmp_path, body, key):
    path = _config(tmp_path, body)
    with pytest.raises(ConfigError) as err:
        load_corpus_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ")
    assert f" {key}:" in message or f" {key}." in message or f": {key}:" in message, message


def test_example_configs_are_valid():
    big = load_corpus_config(REPO / "examples/corpus/modification_9src.yaml")
    assert len(big.sources) == 9
    assert {"cci", "wikipedia", "bookcorpus"} <= {s.name for s in big.sources}
    tiny = load_corpus_config(REPO / "examples/corpus/tiny_cpu.yaml")
    assert len(tiny.sources) == 3


def _cli():
    spec = importlib.util.spec_from_file_location(
        "prepare_corpus_cli", REPO / "tools" / "prepare_corpus.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_skips_up_to_date_and_writes_blend(tmp_path_factory, tmp_path, capsys):
    root = tmp_path_factory.getbasetemp()
    texts = [t for t in dh.english_texts()]
    write_jsonl(texts[:40], tmp_path / "a.jsonl")
    write_jsonl(texts[40:100], tmp_path / "b" / "part1.jsonl")
    write_jsonl(texts[100:130], tmp_path / "b" / "part2.jsonl")
    rows = [
        {"text": t, "meta": {"lang": "en" if i % 2 else "fr"}} for i, t in enumerate(texts[:50])
    ]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "tokenizer": {"type": "HuggingFaceTokenizer", "model": str(dh.hf_tokenizer_dir(root))},
        "output_dir": "out",
        "sources": [
            {"name": "a", "inputs": ["a.jsonl"], "weight": 2},
            {"name": "b", "inputs": ["b"], "weight": 3},
            {"name": "c", "inputs": ["c.jsonl"], "weight": 5,
             "filters": {"language": ["en"], "language_key": "meta.lang"}},
        ],
    }  # fmt: skip
    cfg_path = tmp_path / "corpus.yaml"
    cfg_path.write_text(yaml.safe_dump(config))

    cli = _cli()
    assert cli.main(["--config", str(cfg_path)]) == 0
    first = capsys.readouterr().out
    assert "up to date" not in first
    for name, docs in (("a", 40), ("b", 90), ("c", 25)):
        line = next(ln for ln in first.splitlines() if ln.startswith(name + " "))
        assert f" {docs} " in line, line
        assert len(IndexedDataset(str(tmp_path / "out" / f"{name}_text_document"))) == docs

    # Blend: the --data-args-path file and the printed --data-path hold the normalised weights.
    out = tmp_path / "out"
    prefixes, weights = parse_blend(read_data_args_file(str(out / "blend.txt")))
    assert prefixes == [str(out / f"{n}_text_document") for n in "abc"]
    assert weights == pytest.approx([0.2, 0.3, 0.5])
    data_path = next(ln for ln in first.splitlines() if ln.startswith("--data-path "))
    assert parse_blend(data_path.split(maxsplit=1)[1]) == (prefixes, weights)
    blend = json.loads((out / "blend.json").read_text())
    assert [s["documents"] for s in blend["sources"]] == [40, 90, 25]

    # Second run: nothing to do; the outputs are not rewritten.
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*.bin")}
    assert cli.main(["--config", str(cfg_path)]) == 0
    second = capsys.readouterr().out
    assert second.count("(up to date)") == 3
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.bin")} == mtimes

    # A changed input reprocesses only its source.
    write_jsonl(texts[40:110], tmp_path / "b" / "part1.jsonl")
    os.utime(tmp_path / "b" / "part1.jsonl", ns=(1, 1))  # a different mtime in any case
    assert cli.main(["--config", str(cfg_path)]) == 0
    third = capsys.readouterr().out
    assert third.count("(up to date)") == 2
    assert "[b] preprocessing 2 file(s)" in third
    assert len(IndexedDataset(str(out / "b_text_document"))) == 100


def test_prepare_corpus_multi_key_source_splits_weight_by_tokens(tmp_path_factory, tmp_path):
    root = tmp_path_factory.getbasetemp()
    texts = list(dh.english_texts())[:30]
    rows = [{"title": t.split()[0], "text": t} for t in texts]
    (tmp_path / "k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_jsonl(texts, tmp_path / "p.jsonl")
    cfg = _config(
        tmp_path,
        f"""
        tokenizer: {{type: HuggingFaceTokenizer, model: "{dh.hf_tokenizer_dir(root)}"}}
        sources:
          - {{name: k, inputs: [k.jsonl], json_keys: [text, title], weight: 1}}
          - {{name: p, inputs: [p.jsonl], weight: 1}}
        """,
    )
    results, data_path, _ = prepare_corpus(load_corpus_config(cfg), log=lambda *_: None)
    prefixes, weights = parse_blend(data_path)
    assert len(prefixes) == 3 and sum(weights) == pytest.approx(1.0)
    k = results[0]
    assert weights[0] / weights[1] == pytest.approx(k.tokens["text"] / k.tokens["title"])
    assert weights[2] == pytest.approx(0.5)
