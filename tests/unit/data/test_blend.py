"""Blends through megatron-core's BlendedMegatronDatasetBuilder + GPTDataset: samples follow the
weights, a training sample decodes back to the source text, and the tokenizer adapter fits."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from megatron_mod.data.datasets import build_gpt_datasets, parse_blend
from megatron_mod.data.local_text import write_jsonl
from megatron_mod.data.megatron_tokenizer import MegatronTokenizerAdapter, megatron_tokenizer
from megatron_mod.data.preprocess import PreprocessConfig, preprocess
from tests.helpers import data as dh


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Three small sources (licences, docstrings, docstrings again) as indexed datasets."""
    root = tmp_path_factory.getbasetemp()
    work = tmp_path_factory.mktemp("blend")
    texts = [t for t in dh.english_texts() if t.isascii()]
    groups = {"licences": texts[:120], "docs_a": texts[150:260], "docs_b": texts[260:]}
    prefixes, source_texts = {}, {}
    for name, group in groups.items():
        path = write_jsonl(group, work / f"{name}.jsonl")
        s = preprocess(
            PreprocessConfig(
                input=str(path),
                output_prefix=str(work / name),
                tokenizer_type="HuggingFaceTokenizer",
                tokenizer_model=str(dh.hf_tokenizer_dir(root)),
                append_eod=True,
                progress=False,
            )
        )
        prefixes[name] = s.outputs["text"]
        source_texts[name] = group
    tok = megatron_tokenizer("HuggingFaceTokenizer", str(dh.hf_tokenizer_dir(root)))
    return prefixes, source_texts, tok


def test_parse_blend():
    assert parse_blend("0.3 a 0.7 b") == (["a", "b"], [0.3, 0.7])
    assert parse_blend(["a", "b"]) == (["a", "b"], None)
    with pytest.raises(ValueError):
        parse_blend("0.3 a 0.7")
    with pytest.raises(ValueError):
        parse_blend("0 a 1 b")


def test_adapter_is_a_megatron_core_tokenizer(sources):
    from megatron.core.tokenizers import MegatronTokenizerBase

    _, _, tok = sources
    assert isinstance(tok, MegatronTokenizerAdapter) and isinstance(tok, MegatronTokenizerBase)
    ids = tok.tokenize("Return the absolute value.")
    assert tok.detokenize(ids) == "Return the absolute value."
    assert tok.eod == tok.eos != tok.pad


def test_blend_samples_follow_weights_and_decode_to_text(sources):
    prefixes, source_texts, tok = sources
    names = list(prefixes)
    weights = [0.2, 0.3, 0.5]
    blend = " ".join(f"{w} {prefixes[n]}" for w, n in zip(weights, names))
    n_train = 2000
    train, valid, test = build_gpt_datasets(
        blend, tok, seq_length=64, num_samples=[n_train, 50, 0], split="90,10,0", seed=7
    )
    assert len(train) == n_train and len(valid) == 50 and test is None
    counts = Counter(int(train.dataset_index[i]) for i in range(n_train))
    shares = [counts[i] / n_train for i in range(3)]
    assert shares == pytest.approx(weights, abs=0.01)

    # Every sample is real text of the source it claims: each EOD-free run of >= 8 tokens
    # decodes to a substring of one of that source's documents.
    checked = 0
    for i in range(0, n_train, 97):
        sample = train[i]
        source = source_texts[names[int(sample["dataset_id"])]]
        tokens = np.concatenate([sample["tokens"][:1], sample["labels"]]).tolist()
        runs, run = [], []
        for t in tokens:
            if t == tok.eod:
                runs.append(run)
                run = []
            else:
                run.append(t)
        runs.append(run)
        for run in runs:
            if len(run) >= 8:
                # Drop the first/last token: a sample may cut a multi-byte token sequence.
                text = tok.detokenize(run[1:-1])
                assert any(text in doc for doc in source), text
                checked += 1
    assert checked >= 20
    # Labels are tokens shifted by one; position ids and loss mask are megatron-core's.
    s = train[0]
    assert s["tokens"].shape[0] == 64 and s["loss_mask"].sum() == 64


def test_samples_carry_no_attention_mask_and_eod_masking_still_applies(sources):
    """The causal trainer takes no mask: none is built per sample (s x s fp32 otherwise)."""
    prefixes, _, tok = sources
    train, _, _ = build_gpt_datasets(
        next(iter(prefixes.values())), tok, seq_length=64, num_samples=[20, 0, 0],
        split="100,0,0", seed=1, eod_mask_loss=True,
    )  # fmt: skip
    saw_eod = False
    for i in range(20):
        sample = train[i]
        assert "attention_mask" not in sample
        eod = sample["tokens"] == tok.eod
        assert (sample["loss_mask"][eod] == 0).all()
        saw_eod |= bool(eod.any())
    assert saw_eod


def test_cached_build_under_torch_distributed_matches_in_memory(sources, mcore, tmp_path):
    """With a cache directory megatron-core needs torch.distributed (rank 0 writes, a barrier);
    the cached indices give the same samples as the in-memory build."""
    prefixes, _, tok = sources
    blend = " ".join(f"{w} {p}" for w, p in zip([1, 2, 3], prefixes.values()))
    kwargs = dict(seq_length=32, num_samples=[300, 0, 0], split="100,0,0", seed=3)
    cached, _, _ = build_gpt_datasets(blend, tok, path_to_cache=str(tmp_path), **kwargs)
    assert any(p.suffix == ".npy" for p in tmp_path.rglob("*"))
    memory, _, _ = build_gpt_datasets(blend, tok, **kwargs)
    for i in range(0, 300, 37):
        assert np.array_equal(cached[i]["tokens"], memory[i]["tokens"])
