"""Make the inputs of examples/corpus/tiny_cpu.yaml from text that ships with the machine.

Writes three sources in the three supported formats plus a tokenizer, under ``--out``:

* ``licences.jsonl``: paragraphs of /usr/share/common-licenses;
* ``docstrings_a.jsonl.gz`` and ``docstrings_b.parquet``: standard-library docstrings (halves);
* ``tokenizer/``: a byte-level BPE trained on all of it, as a Hugging Face tokenizer directory.

Usage: python examples/corpus/make_tiny_corpus.py --out work/tiny_corpus
then:  python tools/prepare_corpus.py --config examples/corpus/tiny_cpu.yaml --root work/tiny_corpus
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from megatron_mod.data.local_text import (
    licence_paragraphs,
    stdlib_docstrings,
    train_hf_bpe,
    write_jsonl,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="work/tiny_corpus")
    p.add_argument("--docstrings", type=int, default=2000, help="docstrings to use")
    p.add_argument("--vocab-size", type=int, default=4096)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import pyarrow as pa
    import pyarrow.parquet as pq

    licences = licence_paragraphs()
    docs = stdlib_docstrings(limit=args.docstrings)
    half = len(docs) // 2
    write_jsonl(licences, out / "licences.jsonl")
    with gzip.open(out / "docstrings_a.jsonl.gz", "wt", encoding="utf-8") as f:
        for text in docs[:half]:
            f.write(json.dumps({"text": text, "language": "en"}) + "\n")
    pq.write_table(
        pa.table({"text": docs[half:]}), out / "docstrings_b.parquet", row_group_size=256
    )
    train_hf_bpe(licences + docs, out / "tokenizer", vocab_size=args.vocab_size)
    print(f"wrote {len(licences)} licence paragraphs and {len(docs)} docstrings to {out}")


if __name__ == "__main__":
    main()
