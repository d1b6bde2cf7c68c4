"""Shared inputs for the data-pipeline tests: real English text and locally trained tokenizers.

Built once per test session (cached here, under pytest's session temp directory) and reused by
every module of ``tests/unit/data/``.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

from tests.helpers.subprocess_utils import REPO, subprocess_env

PREPROCESS = REPO / "tools" / "preprocess_data.py"

# Non-ASCII and abbreviation-heavy text next to the machine's English, so tokenization and
# sentence splitting are checked beyond plain ASCII prose.
EXTRA_TEXTS = [
    "Dr. Smith arrived at 3 p.m. on Jan. 5th. He said: \"It's fine!\" Then he left, didn't he?",
    "Zürich, São Paulo and Kraków are cities. Ça va? Déjà vu — naïve café, 東京 and Москва.",
    "Version 3.11.7 of Python was released. The value of pi is approx. 3.14159. E.g. this one.",
]


@functools.cache
def english_texts(n_docstrings: int = 250) -> tuple[str, ...]:
    """Licence paragraphs, some standard-library docstrings and a few non-ASCII texts."""
    from megatron_mod.data.local_text import licence_paragraphs, stdlib_docstrings

    texts = licence_paragraphs()[:150] + stdlib_docstrings(limit=n_docstrings) + EXTRA_TEXTS
    assert len(texts) > 300, "expected real text on this machine"
    return tuple(texts)


@functools.cache
def hf_tokenizer_dir(root: Path) -> Path:
    """A byte-level BPE Hugging Face tokenizer directory trained on :func:`english_texts`."""
    from megatron_mod.data.local_text import train_hf_bpe

    return train_hf_bpe(english_texts(), root / "hf_tokenizer", vocab_size=1024)


@functools.cache
def sp_model(root: Path) -> Path:
    """A sentencepiece unigram model trained on :func:`english_texts`."""
    from megatron_mod.data.local_text import train_sentencepiece

    return train_sentencepiece(english_texts(), root / "sp" / "tok", vocab_size=800)


def run_preprocess(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run tools/preprocess_data.py in a child process (no progress bar); return the result."""
    return subprocess.run(
        [sys.executable, str(PREPROCESS), "--no-progress", *[str(a) for a in args]],
        env=subprocess_env(threads=1),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_main(args: list, capsys) -> tuple[int, str, str]:
    """Run tools/preprocess_data.py's ``main`` in this process; return (status, stdout, stderr).

    Same code path as the command line minus interpreter start-up (transformers and torch
    imports cost seconds per child process on a small machine).
    """
    import importlib.util

    spec = importlib.util.spec_from_file_location("preprocess_data_cli", PREPROCESS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    capsys.readouterr()
    status = module.main(["--no-progress", *[str(a) for a in args]])
    out = capsys.readouterr()
    return status, out.out, out.err
