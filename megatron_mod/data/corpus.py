"""Corpus configs (YAML): sources, weights, filters -> indexed datasets + a Megatron blend.

A config names a tokenizer, an output directory and a list of sources; each source has input
globs, JSON keys, optional filters and a weight. :func:`prepare_corpus` preprocesses every source
(skipping those whose outputs are up to date), then writes the blend as a ``--data-path``
string and as a ``--data-args-path`` file. Relative paths in a config resolve against a root
directory: the config file's directory unless the caller passes another.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from megatron_mod.atomic import write_text_atomic
from megatron_mod.data.preprocess import (
    PreprocessConfig,
    PreprocessSummary,
    output_prefixes,
    preprocess,
)
from megatron_mod.data.readers import expand_inputs
from megatron_mod.data.tokenizers import TOKENIZER_TYPES
from megatron_mod.errors import MegatronModError

__all__ = [
    "ConfigError",
    "CorpusConfig",
    "SourceConfig",
    "SourceFilters",
    "SourceResult",
    "TokenizerSpec",
    "format_table",
    "load_corpus_config",
    "prepare_corpus",
]


class ConfigError(MegatronModError, ValueError):
    """An invalid corpus config; the message names the file and the key."""


def _fail(where: str, key: str, message: str):
    raise ConfigError(f"{where}{'.' if where and not where.endswith(': ') else ''}{key}: {message}")


def _strings(value, where: str, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not value:
        _fail(where, key, "expected a string or a non-empty list of strings")
    if not all(isinstance(v, str) and v for v in value):
        _fail(where, key, f"expected non-empty strings, got {value!r}")
    return tuple(value)


@dataclass
class TokenizerSpec:
    """Which tokenizer every source is encoded with."""

    type: str
    """``HuggingFaceTokenizer`` or ``SentencePieceTokenizer``."""
    model: str
    """Local HF tokenizer directory or sentencepiece ``.model`` (relative: to the root)."""
    special_tokens: bool = True
    """Let a Hugging Face tokenizer add its special tokens (LLaMA: BOS); false: none."""
    where: str = field(default="tokenizer", repr=False, compare=False)
    """Location (file: key) used in error messages."""

    def __post_init__(self):
        if self.type not in TOKENIZER_TYPES:
            _fail(self.where, "type", f"{self.type!r} is not one of {list(TOKENIZER_TYPES)}")
        if not isinstance(self.model, str) or not self.model:
            _fail(self.where, "model", "expected a path")
        if not isinstance(self.special_tokens, bool):
            _fail(self.where, "special_tokens", f"expected true/false, got {self.special_tokens!r}")


@dataclass
class SourceFilters:
    """Optional per-source record filters."""

    min_chars: int = 0
    """Drop records shorter than this (characters over all keys)."""
    language: tuple[str, ...] = ()
    """Keep only records whose language field is one of these codes (empty: keep all)."""
    language_key: str = "language"
    """Dotted record field holding the language code (no language detection is run)."""
    where: str = field(default="filters", repr=False, compare=False)
    """Location (file: key) used in error messages."""

    def __post_init__(self):
        if isinstance(self.min_chars, bool) or not isinstance(self.min_chars, int):
            _fail(self.where, "min_chars", f"expected an integer, got {self.min_chars!r}")
        if self.min_chars < 0:
            _fail(self.where, "min_chars", f"must be >= 0, got {self.min_chars}")
        self.language = _strings(self.language, self.where, "language") if self.language else ()
        if not isinstance(self.language_key, str) or not self.language_key:
            _fail(self.where, "language_key", "expected a field name")


@dataclass
class SourceConfig:
    """One corpus source."""

    name: str
    """Short unique name; also the output file prefix."""
    inputs: tuple[str, ...]
    """Input files, globs or directories (relative: to the root)."""
    weight: float
    """Blend weight (relative; normalised over all sources)."""
    json_keys: tuple[str, ...] = ("text",)
    """Record fields holding the text."""
    filters: SourceFilters = field(default_factory=SourceFilters)
    """Record filters."""
    where: str = field(default="source", repr=False, compare=False)
    """Location (file: key) used in error messages."""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            _fail(self.where, "name", "expected a non-empty string")
        if not self.name.replace("-", "_").replace(".", "_").isidentifier():
            _fail(self.where, "name", f"{self.name!r}: use letters, digits, '_', '-', '.'")
        self.inputs = _strings(self.inputs, self.where, "inputs")
        self.json_keys = _strings(self.json_keys, self.where, "json_keys")
        if isinstance(self.weight, bool) or not isinstance(self.weight, int | float):
            _fail(self.where, "weight", f"expected a number, got {self.weight!r}")
        if not math.isfinite(self.weight) or self.weight <= 0:
            _fail(self.where, "weight", f"must be > 0, got {self.weight}")


@dataclass
class CorpusConfig:
    """A corpus: tokenizer, output directory, preprocessing options and sources."""

    tokenizer: TokenizerSpec
    """Tokenizer for all sources."""
    sources: list[SourceConfig]
    """The sources, in blend order."""
    output_dir: str = "data"
    """Where indexed datasets and the blend files go (relative: to the root)."""
    append_eod: bool = True
    """Append EOD to every document."""
    split_sentences: bool = False
    """Split documents into sentences."""
    lang: str = "english"
    """Punkt language for sentence splitting."""
    workers: int = 1
    """Tokenizer processes per source."""
    on_error: str = "skip"
    """``skip`` or ``fail`` on bad records."""
    path: str = field(default="<config>", repr=False, compare=False)
    """The config file (for error messages)."""

    def __post_init__(self):
        where = f"{self.path}: "
        if not self.sources:
            _fail(where, "sources", "at least one source is required")
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            _fail(where, "sources", f"duplicate source name(s) {dupes}")
        for key in ("append_eod", "split_sentences"):
            if not isinstance(getattr(self, key), bool):
                _fail(where, key, f"expected true/false, got {getattr(self, key)!r}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            _fail(where, "workers", f"expected an integer >= 1, got {self.workers!r}")
        if self.on_error not in ("skip", "fail"):
            _fail(where, "on_error", f"expected 'skip' or 'fail', got {self.on_error!r}")
        if not isinstance(self.output_dir, str) or not self.output_dir:
            _fail(where, "output_dir", "expected a path")


def _build(cls, data, where: str, nested: dict | None = None):
    """Instantiate dataclass ``cls`` from a mapping, refusing unknown and missing keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    allowed = {f for f in cls.__dataclass_fields__ if f not in ("where", "path")}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (allowed: {sorted(allowed)})")
    required = [
        name
        for name, f in cls.__dataclass_fields__.items()
        if name in allowed and f.default is f.default_factory  # both MISSING: required
    ]
    for name in required:
        if name not in data:
            raise ConfigError(f"{where}.{name}: required key is missing")
    kwargs = dict(data)
    for key, builder in (nested or {}).items():
        if key in kwargs:
            kwargs[key] = builder(kwargs[key])
    try:
        return cls(**kwargs, where=where)
    except TypeError as e:  # pragma: no cover - guarded by the key checks above
        raise ConfigError(f"{where}: {e}") from e


def load_corpus_config(path: str | os.PathLike) -> CorpusConfig:
    """Read and validate a corpus YAML file.

    Args:
        path: the YAML file.

    Returns:
        The validated config.

    Raises:
        ConfigError: naming the file and the offending key.
    """
    import yaml

    path = str(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    allowed = {f for f in CorpusConfig.__dataclass_fields__ if f != "path"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{path}: {unknown[0]}: unknown key (allowed: {sorted(allowed)})")
    for key in ("tokenizer", "sources"):
        if key not in data:
            raise ConfigError(f"{path}: {key}: required key is missing")
    tokenizer = _build(TokenizerSpec, data["tokenizer"], f"{path}: tokenizer")
    raw_sources = data["sources"]
    if not isinstance(raw_sources, list):
        raise ConfigError(f"{path}: sources: expected a list of sources")
    sources = []
    for i, raw in enumerate(raw_sources):
        where = f"{path}: sources[{i}]"
        sources.append(
            _build(
                SourceConfig,
                raw,
                where,
                nested={"filters": lambda v, w=where: _build(SourceFilters, v, f"{w}.filters")},
            )
        )
    rest = {k: v for k, v in data.items() if k not in ("tokenizer", "sources")}
    return CorpusConfig(tokenizer=tokenizer, sources=sources, path=path, **rest)


@dataclass
class SourceResult:
    """What one source contributed."""

    name: str
    """Source name."""
    weight: float
    """Normalised blend weight of the source."""
    prefixes: dict[str, str]
    """JSON key -> indexed dataset prefix."""
    documents: int
    """Documents written."""
    tokens: dict[str, int]
    """Tokens per key."""
    skipped: dict[str, int]
    """Bad records per reason."""
    filtered: dict[str, int]
    """Filtered records per reason."""
    up_to_date: bool
    """True if the outputs were reused without preprocessing."""

    @property
    def total_tokens(self) -> int:
        """Tokens over all keys."""
        return sum(self.tokens.values())


def _resolve(root: Path, p: str) -> str:
    p = os.path.expanduser(os.path.expandvars(p))
    return p if os.path.isabs(p) else str(root / p)


def _fingerprint(paths: Sequence[str]) -> list:
    out = []
    for p in paths:
        if os.path.isdir(p):
            for sub in sorted(Path(p).rglob("*")):
                if sub.is_file():
                    st = sub.stat()
                    out.append([str(sub), st.st_size, st.st_mtime_ns])
        else:
            st = os.stat(p)
            out.append([p, st.st_size, st.st_mtime_ns])
    return out


def _stamp_path(prefix_base: str) -> str:
    return prefix_base + ".stamp.json"


def prepare_corpus(
    config: CorpusConfig,
    root: str | os.PathLike | None = None,
    force: bool = False,
    workers: int | None = None,
    log=print,
) -> tuple[list[SourceResult], str, str]:
    """Preprocess every source of ``config`` and write the blend.

    A source is skipped when its ``.bin``/``.idx`` exist and its stamp file records the same
    input files (size, mtime), tokenizer files and options.

    Args:
        config: the corpus config.
        root: directory relative paths resolve against (default: the config file's directory).
        force: reprocess every source.
        workers: override ``config.workers``.
        log: where progress lines go.

    Returns:
        ``(results, data_path, data_args_path)``: per-source results, the ``--data-path``
        string and the path of the ``--data-args-path`` file.
    """
    root = Path(root) if root is not None else Path(config.path).resolve().parent
    out_dir = Path(_resolve(root, config.output_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    tok_model = _resolve(root, config.tokenizer.model)
    total_weight = sum(s.weight for s in config.sources)
    results = []
    for source in config.sources:
        base = str(out_dir / source.name)
        files = expand_inputs([_resolve(root, p) for p in source.inputs])
        options = {
            "json_keys": list(source.json_keys),
            "tokenizer_type": config.tokenizer.type,
            "tokenizer": _fingerprint([tok_model]),
            "special_tokens": config.tokenizer.special_tokens,
            "append_eod": config.append_eod,
            "split_sentences": config.split_sentences,
            "lang": config.lang,
            "min_chars": source.filters.min_chars,
            "language": list(source.filters.language),
            "language_key": source.filters.language_key,
        }
        stamp = {"inputs": _fingerprint(files), "options": options}
        digest = hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()
        prefixes = output_prefixes(base, source.json_keys, config.split_sentences)
        outputs_exist = all(
            os.path.exists(p + ext) for p in prefixes.values() for ext in (".bin", ".idx")
        )
        previous = None
        if outputs_exist and not force and os.path.exists(_stamp_path(base)):
            with open(_stamp_path(base), encoding="utf-8") as f:
                previous = json.load(f)
        if previous is not None and previous.get("digest") == digest:
            summary = previous["summary"]
            log(f"[{source.name}] up to date, skipped")
            up_to_date = True
        else:
            log(f"[{source.name}] preprocessing {len(files)} file(s)")
            s: PreprocessSummary = preprocess(
                PreprocessConfig(
                    input=files,
                    output_prefix=base,
                    tokenizer_type=config.tokenizer.type,
                    tokenizer_model=tok_model,
                    special_tokens=config.tokenizer.special_tokens,
                    json_keys=source.json_keys,
                    append_eod=config.append_eod,
                    split_sentences=config.split_sentences,
                    lang=config.lang,
                    workers=workers or config.workers,
                    on_error=config.on_error,
                    min_chars=source.filters.min_chars,
                    language_key=source.filters.language_key,
                    languages=source.filters.language,
                    log_interval=0,
                )
            )
            summary = s.to_dict()
            write_text_atomic(
                _stamp_path(base),
                json.dumps({"digest": digest, **stamp, "summary": summary}, indent=1),
            )
            up_to_date = False
        results.append(
            SourceResult(
                name=source.name,
                weight=source.weight / total_weight,
                prefixes=prefixes,
                documents=summary["documents"],
                tokens=summary["tokens"],
                skipped=summary["skipped"],
                filtered=summary["filtered"],
                up_to_date=up_to_date,
            )
        )
    data_path, data_args_path = _write_blend(results, out_dir)
    return results, data_path, data_args_path


def _blend_pairs(results: Sequence[SourceResult]) -> list[tuple[float, str]]:
    pairs = []
    for r in results:
        # A source with several keys shares its weight among them in proportion to tokens.
        total = r.total_tokens or 1
        for key, prefix in r.prefixes.items():
            pairs.append((r.weight * r.tokens[key] / total, os.path.abspath(prefix)))
    return pairs


def _write_blend(results: Sequence[SourceResult], out_dir: Path) -> tuple[str, str]:
    pairs = _blend_pairs(results)
    data_path = " ".join(f"{w:.8g} {p}" for w, p in pairs)
    args_file = out_dir / "blend.txt"
    write_text_atomic(args_file, "".join(f"{w:.8g} {p}\n" for w, p in pairs))
    table = [
        {"name": r.name, "weight": r.weight, "documents": r.documents, "tokens": r.tokens,
         "prefixes": r.prefixes, "skipped": r.skipped, "filtered": r.filtered}
        for r in results
    ]  # fmt: skip
    (out_dir / "blend.json").write_text(
        json.dumps({"data_path": data_path, "sources": table}, indent=1), encoding="utf-8"
    )
    return data_path, str(args_file)


def format_table(results: Sequence[SourceResult]) -> str:
    """Sources with documents, tokens, natural token share, blend share and upsampling."""
    total_tokens = sum(r.total_tokens for r in results) or 1
    header = f"{'source':<16} {'docs':>10} {'tokens':>14} {'tok share':>9} {'weight':>8} {'x':>6}"
    lines = [header, "-" * len(header)]
    for r in results:
        natural = r.total_tokens / total_tokens
        # x: how many times the source is seen per pass over the corpus's own proportions
        # (>1 upsampled, <1 downsampled).
        ratio = r.weight / natural if natural else float("inf")
        lines.append(
            f"{r.name:<16} {r.documents:>10,} {r.total_tokens:>14,} {natural:>9.2%} "
            f"{r.weight:>8.2%} {ratio:>6.2f}" + ("  (up to date)" if r.up_to_date else "")
        )
    lines.append(f"{'total':<16} {sum(r.documents for r in results):>10,} {total_tokens:>14,}")
    return "\n".join(lines)
