"""Preprocessing throughput and peak memory: docs/s, tokens/s, MB/s and peak PSS, 1 and 2 workers.

The corpus is real English text from the machine (licence texts, standard-library docstrings),
documents re-assembled from shuffled paragraphs until the JSONL reaches ``--size-mb`` (200 MB by
default); the tokenizer is a byte-level BPE trained locally and saved as a Hugging Face directory
that adds BOS ``<s>`` to every text, like LLaMA's. Each run is a fresh process; peak memory is
the largest sum of PSS over the process and its workers, sampled every 0.25 s (shared pages
count once).

Megatron-LM's own ``tools/preprocess_data.py`` runs side by side on the same input and tokenizer
when ``--megatron-lm GIT_DIR`` names a Megatron-LM clone: the tool and the ``megatron`` packages
it imports, at the tag of the installed megatron-core, are extracted into a temporary directory
together with the packages it needs that megatron-core lacks (``six``, ``pydantic``, ``triton``,
pip-installed there, never into the environment; ``--megatron-lm-wheels DIR`` installs from local
wheels), run against the installed megatron-core, and deleted afterwards. Its default tokenizer
system writes no special tokens, so ours runs with ``--no-special-tokens`` and the two outputs
are compared byte for byte (.bin and .idx). If it cannot run, the reason is printed and recorded.

    .venv/bin/python benchmarks/bench_preprocess.py [--size-mb 200] [--megatron-lm GIT_DIR]
        [--megatron-lm-wheels DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from host import cpu_name, cpu_tag, run_with_peak_memory, usable_cores

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_corpus(path: Path, size_bytes: int, seed: int = 0) -> tuple[int, list[str]]:
    """Write documents of 3-12 shuffled real paragraphs until ``size_bytes``; return count."""
    from megatron_mod.data.local_text import licence_paragraphs, stdlib_docstrings

    paragraphs = licence_paragraphs(min_chars=80) + stdlib_docstrings(min_chars=80)
    rng = random.Random(seed)
    written = docs = 0
    with path.open("w", encoding="utf-8") as f:
        while written < size_bytes:
            text = "\n\n".join(rng.choice(paragraphs) for _ in range(rng.randint(3, 12)))
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            docs += 1
    return docs, paragraphs


def run_measured(cmd: list[str], env: dict) -> tuple[float, float, subprocess.CompletedProcess]:
    """Run ``cmd``; return (wall seconds, peak memory of the process tree in MiB, result).

    Memory is the sum of PSS (proportional set size) over the process and its workers, so pages
    that forked workers share with the parent count once, not once per process.
    """
    res, wall, peak = run_with_peak_memory(cmd, env, measure="pss", interval_s=0.25)
    return wall, peak / 2**20, res


MLM_PATHS = ("tools/preprocess_data.py", "megatron/training", "megatron/legacy", "megatron/rl",
             "megatron/post_training")  # fmt: skip
"""What Megatron-LM's tool imports beyond megatron-core (``megatron.training`` needs the rest)."""
MLM_DEPS = ("six", "pydantic", "triton")
"""Python packages those imports need that megatron-core does not install."""


def _last_line(text: str | bytes) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def extract_megatron_lm(
    git_dir: str, dest: Path, wheels: str | None = None
) -> tuple[Path | None, str]:
    """Make Megatron-LM's ``tools/preprocess_data.py`` runnable against the installed core.

    Extracts the tool and the ``megatron`` packages it imports (``MLM_PATHS``) at the tag of the
    installed megatron-core into ``dest`` (no ``megatron/__init__.py``, so ``dest/megatron`` and
    the installed ``megatron.core`` form one namespace package) and pip-installs ``MLM_DEPS``
    into ``dest/deps``, never into the environment. Run it with ``PYTHONPATH=dest/deps:dest``.

    Args:
        git_dir: a Megatron-LM clone (its ``.git`` or a bare repository).
        dest: an empty directory.
        wheels: a directory of wheels to install from first (e.g. a downloaded ``triton``
            wheel, so no package index is needed for it).

    Returns:
        ``(script, tag)``, or ``(None, reason)`` when something cannot be had.
    """
    import megatron.core

    tag = f"core_v{megatron.core.__version__}"
    git = ["git", f"--git-dir={git_dir}"]
    if not os.path.isdir(git_dir):
        return None, f"no Megatron-LM git directory at {git_dir}"
    try:
        found = subprocess.run([*git, "rev-parse", "--verify", "--quiet", f"{tag}^{{commit}}"],
                               capture_output=True)  # fmt: skip
    except FileNotFoundError:
        return None, "git is not installed"
    if found.returncode != 0:
        return None, f"{git_dir} has no tag {tag} (the installed megatron-core's version)"
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run([*git, "archive", tag, *MLM_PATHS], capture_output=True)
    if archive.returncode != 0:
        return None, f"could not extract {tag} from {git_dir}: {_last_line(archive.stderr)}"
    untar = subprocess.run(["tar", "x", "-C", str(dest)], input=archive.stdout, capture_output=True)
    if untar.returncode != 0:
        return None, f"could not unpack {tag} into {dest}: {_last_line(untar.stderr)}"
    # The packages themselves, by file name when a wheel for them is in `wheels`.
    local = {}
    if wheels and os.path.isdir(wheels):
        for whl in sorted(Path(wheels).glob("*.whl")):
            local.setdefault(whl.name.split("-")[0].lower().replace("_", "-"), str(whl))
    specs = [local.get(name, name) for name in MLM_DEPS]
    pip = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
           "--no-warn-script-location", "--target", str(dest / "deps"), *specs]  # fmt: skip
    print(f"installing {' '.join(specs)} into {dest / 'deps'} for Megatron-LM's tool")
    res = subprocess.run(pip, capture_output=True)
    if res.returncode != 0:
        hint = (
            "" if "triton" in local else " (triton: pass --megatron-lm-wheels DIR with its wheel)"
        )
        return None, f"pip could not install {', '.join(MLM_DEPS)}{hint}: {_last_line(res.stderr)}"
    return dest / "tools" / "preprocess_data.py", tag


def add_bos(tok_dir: Path, out_dir: Path) -> Path:
    """Copy of an HF tokenizer directory that puts BOS ``<s>`` before every text, like LLaMA's."""
    from tokenizers import processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    backend = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True).backend_tokenizer
    backend.add_special_tokens(["<s>"])
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="<|endoftext|>", pad_token="<pad>"
    ).save_pretrained(str(out_dir))
    return out_dir


def _same_files(a: Path, b: Path) -> bool:
    """Whether ``{a}.bin/.idx`` and ``{b}.bin/.idx`` are byte-identical."""
    return all(
        Path(f"{a}{ext}").read_bytes() == Path(f"{b}{ext}").read_bytes() for ext in (".bin", ".idx")
    )


def default_out() -> Path:
    return REPO / "benchmarks" / "results" / f"bench_preprocess_{cpu_tag()}.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=float, default=200)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--megatron-lm", default=None, help="Megatron-LM git dir (optional)")
    p.add_argument(
        "--megatron-lm-wheels",
        default=None,
        help="directory with wheels for Megatron-LM's extra packages (e.g. triton's)",
    )
    p.add_argument(
        "--out", default=None, help="JSON path (default: results/bench_preprocess_<device>.json)"
    )
    args = p.parse_args()
    out_path = Path(args.out) if args.out else default_out()

    from megatron_mod.data.local_text import train_hf_bpe

    tmp = Path(tempfile.mkdtemp(prefix="bench_preprocess_"))
    corpus = tmp / "corpus.jsonl"
    t0 = time.perf_counter()
    n_docs, paragraphs = make_corpus(corpus, int(args.size_mb * 1e6))
    size = corpus.stat().st_size
    print(f"corpus: {n_docs:,} documents, {size / 1e6:.1f} MB ({time.perf_counter() - t0:.0f} s)")
    tok_dir = add_bos(train_hf_bpe(paragraphs, tmp / "bpe", vocab_size=8192), tmp / "tokenizer")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(REPO)
    common = ["--input", str(corpus), "--tokenizer-type", "HuggingFaceTokenizer",
              "--tokenizer-model", str(tok_dir), "--append-eod"]  # fmt: skip

    # Ours with --no-special-tokens: the token layout of Megatron-LM's default tokenizer.
    rows = []
    ours = {}
    for workers in args.workers:
        prefix = tmp / f"ours_w{workers}"
        cmd = [sys.executable, str(REPO / "tools/preprocess_data.py"), *common,
               "--no-special-tokens", "--output-prefix", str(prefix), "--workers", str(workers),
               "--no-progress", "--log-interval", "0",
               "--summary-json", str(tmp / f"ours_w{workers}.json")]  # fmt: skip
        wall, peak, res = run_measured(cmd, env)
        if res.returncode != 0:
            raise SystemExit(f"preprocess_data.py failed:\n{res.stderr[-2000:]}")
        s = json.loads((tmp / f"ours_w{workers}.json").read_text())
        tokens = sum(s["tokens"].values())
        ours[workers] = Path(f"{prefix}_text_document")
        rows.append({
            "tool": "megatron-mod --no-special-tokens", "workers": workers,
            "documents": s["documents"], "tokens": tokens, "wall_s": wall,
            "docs_per_s": s["documents"] / wall, "tokens_per_s": tokens / wall,
            "mb_per_s": size / 1e6 / wall, "peak_pss_mib": peak, "identical_to_megatron_lm": None,
        })  # fmt: skip
        print(f"megatron-mod workers={workers}: {wall:.1f} s, peak {peak:.0f} MiB")
    identical = _same_files(*(ours[w] for w in args.workers[:2])) if len(ours) > 1 else None

    mlm_note = "not run: pass --megatron-lm GIT_DIR (a Megatron-LM clone) to compare"
    mlm_ran = False
    if args.megatron_lm:
        script, info = extract_megatron_lm(args.megatron_lm, tmp / "mlm", args.megatron_lm_wheels)
        mlm_note = info
        if script is None:
            print(f"Megatron-LM not run: {info}")
        else:
            mlm_env = dict(env, PYTHONPATH=f"{tmp / 'mlm' / 'deps'}:{tmp / 'mlm'}")
            for workers in args.workers:
                prefix = tmp / f"mlm_w{workers}"
                cmd = [sys.executable, str(script), *common, "--output-prefix", str(prefix),
                       "--workers", str(workers), "--log-interval", "100000000"]  # fmt: skip
                wall, peak, res = run_measured(cmd, mlm_env)
                # It prints a faulthandler stack at exit but returns 0 with complete output.
                out = Path(f"{prefix}_text_document")
                if res.returncode != 0 or not Path(f"{out}.idx").exists():
                    mlm_note = (f"Megatron-LM {info} failed to run here (exit {res.returncode}): "
                                f"{_last_line(res.stderr)}")  # fmt: skip
                    print(mlm_note)
                    break
                from megatron.core.datasets.indexed_dataset import IndexedDataset

                ds = IndexedDataset(str(out))
                docs, tokens = len(ds.document_indices) - 1, int(ds.sequence_lengths.sum())
                same = _same_files(out, ours[workers])
                rows.append({
                    "tool": f"Megatron-LM {info}", "workers": workers, "documents": docs,
                    "tokens": tokens, "wall_s": wall, "docs_per_s": docs / wall,
                    "tokens_per_s": tokens / wall, "mb_per_s": size / 1e6 / wall,
                    "peak_pss_mib": peak, "identical_to_megatron_lm": same,
                })  # fmt: skip
                next(r for r in rows if r["tool"].startswith("megatron-mod")
                     and r["workers"] == workers)["identical_to_megatron_lm"] = same  # fmt: skip
                print(f"Megatron-LM workers={workers}: {wall:.1f} s, peak {peak:.0f} MiB, "
                      f".bin/.idx identical to ours: {same}")  # fmt: skip
                mlm_ran = True
            if mlm_ran and not mlm_note.startswith("Megatron-LM"):
                mlm_note = (f"Megatron-LM {info} ran on the same input and tokenizer (its default "
                            "tokenizer system, no special tokens)")  # fmt: skip

    rows.sort(key=lambda r: (r["workers"], not r["tool"].startswith("megatron-mod")))
    header = ("| tool | workers | docs/s | tokens/s | MB/s | wall s | peak PSS MiB "
              "| .bin/.idx identical |")  # fmt: skip
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|:---:|"]
    for r in rows:
        same = {True: "yes", False: "NO", None: "–"}[r["identical_to_megatron_lm"]]
        lines.append(
            f"| {r['tool']} | {r['workers']} | {r['docs_per_s']:,.0f} | {r['tokens_per_s']:,.0f} | "
            f"{r['mb_per_s']:.2f} | {r['wall_s']:.1f} | {r['peak_pss_mib']:.0f} | {same} |"
        )
    table = "\n".join(lines)
    speedup = {}
    for w in args.workers:
        pair = [r for r in rows if r["workers"] == w]
        if len(pair) == 2:
            speedup[str(w)] = pair[0]["docs_per_s"] / pair[1]["docs_per_s"]
    print()
    print(table)
    print(f"\n1 vs 2 workers byte-identical: {identical}; Megatron-LM: {mlm_note}")
    if speedup:
        print("docs/s, megatron-mod / Megatron-LM: "
              + ", ".join(f"{v:.2f}x ({w} worker(s))" for w, v in speedup.items()))  # fmt: skip
    result = {
        "cpu": cpu_name(), "cores": usable_cores(), "python": platform.python_version(),
        "load_average_at_end": os.getloadavg(), "corpus_mb": size / 1e6, "documents": n_docs,
        "tokenizer": "byte-level BPE, vocab 8192, trained locally; BOS <s> added like LLaMA's",
        "rows": rows, "one_vs_two_workers_identical": identical, "megatron_lm": mlm_note,
        "megatron_lm_identical_output": {
            str(r["workers"]): r["identical_to_megatron_lm"] for r in rows
            if r["tool"].startswith("Megatron-LM")
        },
        "docs_per_s_ratio_ours_over_megatron_lm": speedup, "table_markdown": table,
    }  # fmt: skip
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1))
    print(f"wrote {out_path}")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
