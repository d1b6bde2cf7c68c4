"""Tokenize a corpus (JSONL, JSONL.gz, Parquet) into Megatron indexed datasets.

Flags follow Megatron-LM's ``tools/preprocess_data.py``. Example::

    python tools/preprocess_data.py --input 'data/wiki/*.jsonl.gz' --output-prefix out/wiki \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model /models/llama2-7b \\
        --append-eod --workers 16

writes ``out/wiki_text_document.bin/.idx``. See docs/data.md.
"""

from __future__ import annotations

import argparse
import json
import sys

from megatron_mod.atomic import write_text_atomic
from megatron_mod.data.preprocess import PreprocessConfig, preprocess
from megatron_mod.data.tokenizers import TOKENIZER_TYPES
from megatron_mod.errors import USER_ERRORS, report


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_argument_group("input data")
    g.add_argument(
        "--input",
        required=True,
        nargs="+",
        help="input file(s), glob(s) or directory(ies): .jsonl, .jsonl.gz, .parquet",
    )
    g.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        help="record fields to tokenize (one output dataset each)",
    )
    g.add_argument(
        "--split-sentences", action="store_true", help="split documents into sentences (NLTK Punkt)"
    )
    g.add_argument(
        "--lang",
        default="english",
        help="Punkt language for --split-sentences (english, german, french, ...)",
    )
    g.add_argument(
        "--keep-newlines",
        action="store_true",
        help="with --split-sentences, keep the whitespace (newlines) after each sentence at its "
        "end, so paragraph breaks survive tokenization",
    )
    g = p.add_argument_group("filters")
    g.add_argument("--min-chars", type=int, default=0, help="skip shorter records")
    g.add_argument(
        "--filter-language-key",
        default=None,
        help="dotted record field with the record's language (default 'language')",
    )
    g.add_argument(
        "--filter-languages",
        nargs="+",
        default=[],
        help="keep only records whose language field is one of these",
    )
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument(
        "--tokenizer-model",
        required=True,
        help="local HF tokenizer directory or sentencepiece .model file",
    )
    g.add_argument(
        "--no-special-tokens",
        action="store_true",
        help="HF tokenizer: do not add the tokenizer's special tokens (e.g. LLaMA's BOS); "
        "the layout of Megatron-LM's default (non-legacy) tokenizer",
    )
    g.add_argument("--append-eod", action="store_true", help="append EOD to every document")
    g = p.add_argument_group("output data")
    g.add_argument(
        "--output-prefix", required=True, help="path prefix; _{key}_document.bin/.idx is appended"
    )
    g.add_argument("--summary-json", default=None, help="also write the summary as JSON here")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    g.add_argument("--chunk-size", type=int, default=64, help="records per worker task")
    g.add_argument(
        "--log-interval", type=int, default=10000, help="progress line every N documents (0: off)"
    )
    g.add_argument(
        "--on-error",
        choices=("skip", "fail"),
        default="skip",
        help="skip (count and report) or fail at the first bad record",
    )
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p.parse_args(argv)  # fmt: skip


def main(argv=None) -> int:
    args = get_args(argv)
    try:
        cfg = PreprocessConfig(
            input=args.input,
            output_prefix=args.output_prefix,
            tokenizer_type=args.tokenizer_type,
            tokenizer_model=args.tokenizer_model,
            special_tokens=not args.no_special_tokens,
            json_keys=args.json_keys,
            append_eod=args.append_eod,
            split_sentences=args.split_sentences,
            lang=args.lang,
            keep_newlines=args.keep_newlines,
            workers=args.workers,
            chunk_size=args.chunk_size,
            on_error=args.on_error,
            log_interval=args.log_interval,
            min_chars=args.min_chars,
            language_key=args.filter_language_key,
            languages=args.filter_languages,
            progress=False if args.no_progress else None,
        )
        summary = preprocess(cfg)
    except USER_ERRORS as e:
        return report(e)
    print(summary.format())
    if args.summary_json:
        write_text_atomic(args.summary_json, json.dumps(summary.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
