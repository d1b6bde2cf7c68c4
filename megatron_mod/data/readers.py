"""Streaming readers for corpus inputs: JSONL, gzipped JSONL and Parquet.

Readers never hold a whole file: JSONL is read line by line (through ``gzip`` for ``.gz``),
Parquet one row group at a time. They do not parse JSON: raw lines go to the worker pool so
that parsing runs in parallel. What a reader cannot read (a truncated or corrupt ``.gz``, an
unreadable Parquet file) is yielded as a :class:`Problem` with the file and line where it
happened, so the caller counts it like any other bad record.
"""

from __future__ import annotations

import glob
import gzip
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

__all__ = [
    "SUPPORTED_SUFFIXES",
    "Problem",
    "RawRecord",
    "expand_inputs",
    "iter_raw_records",
]

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")


@dataclass(frozen=True)
class RawRecord:
    """One unparsed input record."""

    file: str
    """Input path the record came from."""
    line: int
    """1-based line number (JSONL) or row number (Parquet)."""
    payload: bytes | dict
    """The raw JSONL line (bytes, newline stripped) or a Parquet row (column -> value)."""


@dataclass(frozen=True)
class Problem:
    """Something that made part of an input unreadable, located by file and line."""

    file: str
    """Input path."""
    line: int
    """1-based line (or row) at which reading failed."""
    reason: str
    """Short machine-readable reason, e.g. ``truncated_gzip``."""
    detail: str
    """Human-readable detail."""


def _is_supported(path: str) -> bool:
    return path.endswith(SUPPORTED_SUFFIXES)


def expand_inputs(inputs: str | Sequence[str]) -> list[str]:
    """Resolve files, globs and directories to a sorted, de-duplicated list of input files.

    Sorting makes the output order (and so the written binaries) independent of the file
    system's listing order.

    Args:
        inputs: one path/glob or a list of them. Directories are searched recursively for
            files with a supported suffix (``.jsonl``, ``.jsonl.gz``, ``.parquet``, …).

    Returns:
        The matching files.

    Raises:
        FileNotFoundError: if a pattern matches nothing or no input file is found.
    """
    patterns = [inputs] if isinstance(inputs, str) else list(inputs)
    files: list[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = [
                os.path.join(root, name)
                for root, _, names in os.walk(pattern)
                for name in names
                if _is_supported(name)
            ]
        elif os.path.isfile(pattern):
            found = [pattern]
        else:
            found = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
        if not found:
            raise FileNotFoundError(f"input {pattern!r} matches no file")
        files.extend(sorted(found))
    seen: set[str] = set()
    unique = []
    for f in files:
        key = os.path.abspath(f)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def _iter_jsonl(path: str) -> Iterator[RawRecord | Problem]:
    opener = gzip.open if path.endswith(".gz") else open
    line_no = 0
    try:
        with opener(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):  # noqa: B007 (line_no used after loop)
                yield RawRecord(path, line_no, raw.rstrip(b"\r\n"))
    except EOFError as e:
        yield Problem(path, line_no + 1, "truncated_gzip", f"compressed stream ends early ({e})")
    except (gzip.BadGzipFile, zlib.error) as e:
        yield Problem(path, line_no + 1, "corrupt_gzip", str(e))


def _iter_parquet(
    path: str, columns: Sequence[str], batch_rows: int
) -> Iterator[RawRecord | Problem]:
    import pyarrow.parquet as pq

    row = 0
    try:
        pf = pq.ParquetFile(path)
        present = set(pf.schema_arrow.names)
        wanted = [c for c in dict.fromkeys(columns) if c in present]
        # Row groups are read one at a time (iter_batches streams them), so memory stays at one
        # batch of the requested columns whatever the file size.
        for batch in pf.iter_batches(batch_size=batch_rows, columns=wanted):
            cols = {name: batch.column(i).to_pylist() for i, name in enumerate(batch.schema.names)}
            for i in range(batch.num_rows):
                row += 1
                yield RawRecord(path, row, {name: values[i] for name, values in cols.items()})
    except (OSError, ValueError) as e:  # pyarrow raises ArrowInvalid (a ValueError) / OSError
        yield Problem(path, row + 1, "unreadable_parquet", str(e).splitlines()[0])


def iter_raw_records(
    files: Sequence[str], columns: Sequence[str] = ("text",), parquet_batch_rows: int = 1024
) -> Iterator[RawRecord | Problem]:
    """Yield every record of ``files`` in order, unparsed, plus any read problems.

    Args:
        files: input files (see :func:`expand_inputs`).
        columns: Parquet columns to read (JSON keys and filter fields); JSONL lines are yielded
            whole.
        parquet_batch_rows: rows per Parquet read batch.

    Yields:
        :class:`RawRecord` for each line/row, :class:`Problem` where reading a file failed (the
        rest of that file is then skipped).
    """
    for path in files:
        if path.endswith(".parquet"):
            yield from _iter_parquet(path, columns, parquet_batch_rows)
        else:
            yield from _iter_jsonl(path)
