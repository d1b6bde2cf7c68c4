"""Corpus files -> Megatron indexed datasets (``.bin``/``.idx``), streaming and in parallel.

Memory stays bounded whatever the input size: readers stream (see :mod:`.readers`), at most
``4 * workers`` chunks are in flight between the reader and the pool (``Pool.imap`` would read
the whole input ahead of the workers), and tokens are written as soon as their chunk comes back,
in input order, so the output is byte-identical for any number of workers. The only state that
grows is megatron-core's per-document index (kept as compact arrays: 12 bytes per document).

Outputs are ``{prefix}_{key}_document.bin/.idx`` (``_sentence`` with sentence splitting), written
with megatron-core's ``IndexedDatasetBuilder`` under temporary names and renamed only when
complete; a failed run leaves no ``.bin``/``.idx`` pair behind.
"""

from __future__ import annotations

import array
import multiprocessing
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

from megatron_mod.data.encode import (
    FILTER_REASONS,
    SKIP_REASONS,
    EncodeOptions,
    Encoder,
    encode_chunk,
    init_worker,
)
from megatron_mod.data.readers import Problem, expand_inputs, iter_raw_records
from megatron_mod.data.tokenizers import TOKENIZER_TYPES, build_tokenizer
from megatron_mod.errors import MegatronModError

__all__ = [
    "DataError",
    "PreprocessConfig",
    "PreprocessSummary",
    "output_prefixes",
    "preprocess",
    "token_dtype",
]

_EXAMPLES_PER_REASON = 3


class DataError(MegatronModError, RuntimeError):
    """Bad input under ``on_error='fail'``, or an input that yields no document."""


def token_dtype(vocab_size: int):
    """Token dtype for ``vocab_size`` (megatron-core's rule: uint16 below 65500, else int32)."""
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


@dataclass
class PreprocessConfig:
    """Options of one preprocessing run (the CLI flags of ``tools/preprocess_data.py``)."""

    input: Sequence[str] | str
    """Input file(s), glob(s) or directory(ies): .jsonl, .jsonl.gz, .parquet."""
    output_prefix: str
    """Output path prefix; ``_{key}_document`` (or ``_sentence``) and .bin/.idx are appended."""
    tokenizer_type: str
    """``HuggingFaceTokenizer`` or ``SentencePieceTokenizer``."""
    tokenizer_model: str
    """Local HF tokenizer directory or sentencepiece ``.model`` file."""
    special_tokens: bool = True
    """Let a Hugging Face tokenizer add its special tokens (LLaMA: BOS per document); False:
    encode with ``add_special_tokens=False`` (Megatron-LM's current default tokenizer)."""
    json_keys: Sequence[str] = ("text",)
    """Record fields to tokenize, one output dataset each."""
    append_eod: bool = False
    """Append the EOD token to every document."""
    split_sentences: bool = False
    """Split documents into sentences with NLTK Punkt."""
    lang: str = "english"
    """Punkt language for sentence splitting."""
    keep_newlines: bool = False
    """With sentence splitting, keep the whitespace (newlines) that follows each sentence."""
    workers: int = 1
    """Tokenizer processes (1: in this process)."""
    chunk_size: int = 64
    """Records per task sent to a worker."""
    on_error: str = "skip"
    """``skip``: count and report bad records; ``fail``: stop at the first one."""
    log_interval: int = 10000
    """Print a progress line every this many documents (0: never)."""
    min_chars: int = 0
    """Filter: skip records with fewer characters (all keys together)."""
    language_key: str | None = None
    """Filter: dotted path of the record field holding its language."""
    languages: Sequence[str] = ()
    """Filter: keep only records whose language field is one of these."""
    progress: bool | None = None
    """tqdm progress bar: True, False, or None for 'only on a terminal'."""

    def __post_init__(self):
        self.json_keys = tuple(self.json_keys)
        self.languages = tuple(self.languages)
        if not self.json_keys:
            raise ValueError("json_keys: at least one key is required")
        if self.tokenizer_type not in TOKENIZER_TYPES:
            raise ValueError(f"tokenizer_type: {self.tokenizer_type!r} not in {TOKENIZER_TYPES}")
        if self.on_error not in ("skip", "fail"):
            raise ValueError(f"on_error: {self.on_error!r}, expected 'skip' or 'fail'")
        if self.workers < 1:
            raise ValueError(f"workers: {self.workers}, expected >= 1")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size: {self.chunk_size}, expected >= 1")
        if self.min_chars < 0:
            raise ValueError(f"min_chars: {self.min_chars}, expected >= 0")


@dataclass
class PreprocessSummary:
    """What a run read and wrote."""

    files: list[str] = field(default_factory=list)
    """Input files in read order."""
    outputs: dict[str, str] = field(default_factory=dict)
    """JSON key -> output prefix (pass to IndexedDataset / --data-path)."""
    records: int = 0
    """Input records seen (lines / rows, bad ones included)."""
    documents: int = 0
    """Documents written (per key)."""
    sequences: int = 0
    """Index items written over all keys (sentences when splitting, else documents)."""
    tokens: dict[str, int] = field(default_factory=dict)
    """Tokens written per key."""
    text_bytes: int = 0
    """UTF-8 bytes of text tokenized."""
    output_bytes: int = 0
    """Bytes of the .bin files written."""
    seconds: float = 0.0
    """Wall time."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Bad records per reason."""
    filtered: dict[str, int] = field(default_factory=dict)
    """Records removed by corpus filters per reason."""
    examples: dict[str, list[str]] = field(default_factory=dict)
    """First few ``file:line: detail`` per skip reason."""
    vocab_size: int = 0
    """Tokenizer vocabulary size."""
    dtype: str = ""
    """Token dtype of the .bin files."""

    @property
    def total_tokens(self) -> int:
        """Tokens over all keys."""
        return sum(self.tokens.values())

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        return asdict(self)

    def format(self) -> str:
        """Human-readable report."""
        rate = self.documents / self.seconds if self.seconds > 0 else float("nan")
        lines = [
            f"documents: {self.documents:,} from {self.records:,} records in "
            f"{len(self.files)} file(s)",
            f"tokens: {self.total_tokens:,}"
            + (
                f" ({', '.join(f'{k}: {v:,}' for k, v in self.tokens.items())})"
                if len(self.tokens) > 1
                else ""
            ),  # fmt: skip
            f"bytes: {self.text_bytes:,} text in, {self.output_bytes:,} .bin out ({self.dtype})",
            f"time: {self.seconds:.1f} s, {rate:,.0f} docs/s, "
            f"{self.total_tokens / max(self.seconds, 1e-9):,.0f} tokens/s",
        ]
        if self.skipped:
            lines.append(f"skipped: {sum(self.skipped.values()):,} record(s)")
            for reason, count in self.skipped.items():
                lines.append(f"  {reason}: {count:,}")
                lines.extend(f"    {ex}" for ex in self.examples.get(reason, []))
        else:
            lines.append("skipped: 0 records")
        if self.filtered:
            lines.append("filtered: " + ", ".join(f"{r}: {c:,}" for r, c in self.filtered.items()))
        for key, prefix in self.outputs.items():
            lines.append(f"output [{key}]: {prefix}.bin / .idx")
        return "\n".join(lines)


def output_prefixes(
    output_prefix: str, json_keys: Sequence[str], split_sentences: bool
) -> dict[str, str]:
    """Output prefix per JSON key, named as Megatron-LM names them."""
    level = "sentence" if split_sentences else "document"
    return {key: f"{output_prefix}_{key}_{level}" for key in json_keys}


def _chunks(
    files: Sequence[str], columns: Sequence[str], chunk_size: int, counter: list[int]
) -> Iterator[list[tuple]]:
    index = {path: i for i, path in enumerate(files)}
    chunk: list[tuple] = []
    for item in iter_raw_records(files, columns):
        counter[0] += 1
        if isinstance(item, Problem):
            chunk.append((index[item.file], item.line, None, item.reason, item.detail))
        else:
            chunk.append((index[item.file], item.line, item.payload))
        if len(chunk) >= chunk_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class _Writer:
    """One megatron-core IndexedDatasetBuilder per key, on temporary file names."""

    def __init__(self, prefixes: dict[str, str], dtype):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefixes = prefixes
        self.tmp = {k: f"{p}.tmp{os.getpid()}" for k, p in prefixes.items()}
        self.builders = {}
        for key, tmp in self.tmp.items():
            os.makedirs(os.path.dirname(os.path.abspath(tmp)), exist_ok=True)
            builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
            # Compact arrays instead of Python int lists (8x smaller); the builder only appends
            # to and extends them and the index writer converts them with numpy.array.
            builder.sequence_lengths = array.array("i")
            builder.document_indices = array.array("q", [0])
            self.builders[key] = builder

    def add(self, docs) -> None:
        for builder, (tokens, lengths) in zip(self.builders.values(), docs):
            builder.add_document(tokens, lengths)

    def commit(self) -> int:
        written = 0
        for key, builder in self.builders.items():
            tmp = self.tmp[key]
            builder.finalize(tmp + ".idx")
            written += os.path.getsize(tmp + ".bin")
        # The .idx goes last: a reader that finds it can trust the .bin beside it.
        for key in self.builders:
            os.replace(self.tmp[key] + ".bin", self.prefixes[key] + ".bin")
            os.replace(self.tmp[key] + ".idx", self.prefixes[key] + ".idx")
        return written

    def abort(self) -> None:
        for key, builder in self.builders.items():
            try:
                builder.data_file.close()
            except Exception:  # noqa: BLE001 - best-effort cleanup
                pass
            for ext in (".bin", ".idx"):
                try:
                    os.remove(self.tmp[key] + ext)
                except FileNotFoundError:
                    pass


def preprocess(cfg: PreprocessConfig) -> PreprocessSummary:
    """Tokenize the inputs of ``cfg`` into indexed datasets.

    Args:
        cfg: run options.

    Returns:
        The run summary (also printed by the CLI).

    Raises:
        DataError: on the first bad record under ``on_error='fail'``, or when no document at all
            could be written; no output file is left behind either way.
        FileNotFoundError: missing inputs or tokenizer.
        PunktUnavailable: sentence splitting without installed Punkt data.
    """
    from tqdm import tqdm

    start = time.perf_counter()
    files = expand_inputs(cfg.input)
    tokenizer = build_tokenizer(
        cfg.tokenizer_type, cfg.tokenizer_model, special_tokens=cfg.special_tokens
    )
    dtype = token_dtype(tokenizer.vocab_size)
    options = EncodeOptions(
        json_keys=tuple(cfg.json_keys),
        tokenizer_type=cfg.tokenizer_type,
        tokenizer_model=cfg.tokenizer_model,
        dtype=dtype.__name__,
        special_tokens=cfg.special_tokens,
        append_eod=cfg.append_eod,
        split_sentences=cfg.split_sentences,
        lang=cfg.lang,
        keep_newlines=cfg.keep_newlines,
        min_chars=cfg.min_chars,
        language_key=cfg.language_key,
        languages=tuple(cfg.languages),
    )
    prefixes = output_prefixes(cfg.output_prefix, cfg.json_keys, cfg.split_sentences)
    summary = PreprocessSummary(
        files=list(files), outputs=dict(prefixes), vocab_size=tokenizer.vocab_size,
        dtype=dtype.__name__, tokens={k: 0 for k in cfg.json_keys},
    )  # fmt: skip
    skipped: Counter = Counter()
    filtered: Counter = Counter()
    columns = list(cfg.json_keys) + ([cfg.language_key or "language"] if cfg.languages else [])
    records = [0]

    pool = None
    writer = _Writer(prefixes, dtype)
    bar = None
    try:
        if cfg.workers > 1:
            # fork: workers inherit the loaded modules, so they start in milliseconds.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            pool = multiprocessing.get_context(method).Pool(
                cfg.workers, initializer=init_worker, initargs=(options,)
            )
            local = None
        else:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            local = Encoder(options)
        bar = tqdm(desc="documents", unit=" docs", disable=not cfg.progress if cfg.progress
                   is not None else None, file=sys.stderr, mininterval=1.0)  # fmt: skip
        next_log = cfg.log_interval

        def handle(results):
            nonlocal next_log
            for res in results:
                if res[0] == "ok":
                    _, nbytes, docs = res
                    writer.add(docs)
                    summary.documents += 1
                    summary.text_bytes += nbytes
                    for key, (tokens, lengths) in zip(cfg.json_keys, docs):
                        summary.tokens[key] += int(tokens.size)
                        summary.sequences += len(lengths)
                    continue
                _, file_index, line, reason, detail = res
                if reason in FILTER_REASONS:
                    filtered[reason] += 1
                    continue
                where = f"{files[file_index]}:{line}"
                if cfg.on_error == "fail":
                    raise DataError(f"{where}: {reason}: {detail}")
                skipped[reason] += 1
                examples = summary.examples.setdefault(reason, [])
                if len(examples) < _EXAMPLES_PER_REASON:
                    examples.append(f"{where}: {detail}")
            bar.update(len(results))
            if cfg.log_interval and summary.documents >= next_log:
                elapsed = time.perf_counter() - start
                print(
                    f"processed {summary.documents:,} documents "
                    f"({summary.documents / elapsed:,.0f} docs/s, "
                    f"{summary.text_bytes / elapsed / 1e6:.2f} MB/s)",
                    file=sys.stderr,
                    flush=True,
                )
                next_log = (summary.documents // cfg.log_interval + 1) * cfg.log_interval

        chunks = _chunks(files, columns, cfg.chunk_size, records)
        if pool is None:
            for chunk in chunks:
                handle(local.encode_chunk(chunk))
        else:
            in_flight: deque = deque()
            max_in_flight = 4 * cfg.workers
            for chunk in chunks:
                in_flight.append(pool.apply_async(encode_chunk, (chunk,)))
                if len(in_flight) >= max_in_flight:
                    handle(in_flight.popleft().get())
            while in_flight:
                handle(in_flight.popleft().get())
            pool.close()
            pool.join()
            pool = None
        if summary.documents == 0:
            raise DataError(
                f"no document could be written from {len(files)} input file(s) "
                f"({records[0]} records; skipped: {dict(skipped) or 'none'}, "
                f"filtered: {dict(filtered) or 'none'})"
            )
        summary.output_bytes = writer.commit()
    except BaseException:
        writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    summary.records = records[0]
    summary.skipped = {r: skipped[r] for r in SKIP_REASONS if skipped[r]}
    summary.filtered = {r: filtered[r] for r in FILTER_REASONS if filtered[r]}
    summary.seconds = time.perf_counter() - start
    return summary
