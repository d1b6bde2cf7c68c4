"""Large input keeps bounded memory: the CLI's peak RSS on a ~40 MB file stays within a small
margin of its peak on a tiny file, well below what reading the whole file would add."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import data as dh
from tests.helpers.subprocess_utils import subprocess_env

# Runs the CLI as a child and reports the peak RSS (KiB) over it and its worker processes:
# RUSAGE_CHILDREN's ru_maxrss is the largest resident set of any waited-for descendant.
_MEASURE = """
import resource, subprocess, sys
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def _peak_rss_mib(args) -> float:
    cmd = [sys.executable, "-c", _MEASURE, sys.executable, str(dh.PREPROCESS), "--no-progress"]
    res = subprocess.run(
        cmd + [str(a) for a in args], env=subprocess_env(threads=1), capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    rc, kib = res.stdout.split()
    assert rc == "0", res.stderr
    return int(kib) / 1024


def _write_corpus(path, target_bytes: int) -> int:
    """Real text, repeated with a counter; 1 record in 20 is English (tokenized), the rest are
    tagged German and dropped by the language filter after being read and parsed, so the test
    streams tens of MB through the reader and the pool in seconds."""
    texts = list(dh.english_texts())
    written = i = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target_bytes:
            text = texts[i % len(texts)]
            lang = "en" if i % 20 == 0 else "de"
            line = json.dumps({"text": f"{i}: {text}", "lang": lang}) + "\n"
            f.write(line)
            written += len(line)
            i += 1
    return written


@pytest.mark.slow
def test_peak_rss_does_not_grow_with_input_size(tmp_path_factory, tmp_path):
    root = tmp_path_factory.getbasetemp()
    small, large = tmp_path / "small.jsonl", tmp_path / "large.jsonl"
    _write_corpus(small, 200_000)
    size = _write_corpus(large, 40_000_000)
    common = [
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
        dh.hf_tokenizer_dir(root), "--append-eod", "--workers", "2", "--filter-language-key",
        "lang", "--filter-languages", "en",
    ]  # fmt: skip
    base = _peak_rss_mib(["--input", small, "--output-prefix", tmp_path / "s", *common])
    peak = _peak_rss_mib(["--input", large, "--output-prefix", tmp_path / "l", *common])
    # Holding the file (40 MB as bytes, more as str or parsed records) would add >= 40 MiB.
    print(f"peak RSS: {base:.0f} MiB (200 kB input), {peak:.0f} MiB ({size / 1e6:.0f} MB input)")
    assert peak - base < 15, (base, peak, size)
    assert (tmp_path / "l_text_document.idx").exists()
