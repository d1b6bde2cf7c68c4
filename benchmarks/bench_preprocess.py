"""Preprocessing throughput and peak memory: docs/s, tokens/s, MB/s and peak RSS, 1 and 2 workers.

The corpus is real English text from the machine (licence texts, standard-library docstrings),
documents re-assembled from shuffled paragraphs until the JSONL reaches ``--size-mb`` (>= 200 MB
by default); the tokenizer is a byte-level BPE trained locally and saved as a Hugging Face
directory. Each run is a fresh ``tools/preprocess_data.py`` process; peak memory is the largest
sum of PSS over the process and its workers, sampled every 0.25 s (shared pages count once).

Megatron-LM's own ``tools/preprocess_data.py`` runs side by side on the same input and tokenizer
when ``--megatron-lm GIT_DIR`` names a Megatron-LM clone: the script of the tag matching the
installed megatron-core is extracted into a temporary directory (nothing is kept) and run
against the installed megatron-core. If it cannot run, the reason is printed and recorded.

    .venv/bin/python benchmarks/bench_preprocess.py [--size-mb 200] [--megatron-lm PATH]
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

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


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
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            rss = sum(p.memory_full_info().pss for p in [ps, *ps.children(recursive=True)])
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.25)
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    return wall, peak / 2**20, subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def extract_megatron_lm(git_dir: str, dest: Path) -> tuple[Path | None, str]:
    """Extract tools/preprocess_data.py + megatron/training of the installed core's tag."""
    import megatron.core

    tag = f"core_v{megatron.core.__version__}"
    dest.mkdir(parents=True, exist_ok=True)
    try:
        archive = subprocess.run(
            ["git", f"--git-dir={git_dir}", "archive", tag, "tools/preprocess_data.py",
             "megatron/training"],
            check=True, capture_output=True,
        )  # fmt: skip
        subprocess.run(["tar", "x", "-C", str(dest)], input=archive.stdout, check=True)
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        return None, f"could not extract {tag} from {git_dir}: {e}"
    # megatron.training's tokenizer module needs `six`, which megatron-core does not install.
    deps = dest / "deps"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--target", str(deps), "six"],
        capture_output=True,
    )
    return dest / "tools" / "preprocess_data.py", tag


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=float, default=200)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--megatron-lm", default=None, help="Megatron-LM git dir (optional)")
    p.add_argument("--out", default=str(REPO / "benchmarks/results/bench_preprocess_cpu.json"))
    args = p.parse_args()

    from megatron_mod.data.local_text import train_hf_bpe

    tmp = Path(tempfile.mkdtemp(prefix="bench_preprocess_"))
    corpus = tmp / "corpus.jsonl"
    t0 = time.perf_counter()
    n_docs, paragraphs = make_corpus(corpus, int(args.size_mb * 1e6))
    size = corpus.stat().st_size
    print(f"corpus: {n_docs:,} documents, {size / 1e6:.1f} MB ({time.perf_counter() - t0:.0f} s)")
    tok_dir = train_hf_bpe(paragraphs, tmp / "tokenizer", vocab_size=8192)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(REPO)
    common = ["--input", str(corpus), "--tokenizer-type", "HuggingFaceTokenizer",
              "--tokenizer-model", str(tok_dir), "--append-eod"]  # fmt: skip

    rows = []
    ours = {}
    for workers in args.workers:
        prefix = tmp / f"ours_w{workers}"
        cmd = [sys.executable, str(REPO / "tools/preprocess_data.py"), *common, "--output-prefix",
               str(prefix), "--workers", str(workers), "--no-progress", "--log-interval", "0",
               "--summary-json", str(tmp / f"ours_w{workers}.json")]  # fmt: skip
        wall, peak, res = run_measured(cmd, env)
        if res.returncode != 0:
            raise SystemExit(f"preprocess_data.py failed:\n{res.stderr[-2000:]}")
        s = json.loads((tmp / f"ours_w{workers}.json").read_text())
        tokens = sum(s["tokens"].values())
        ours[workers] = prefix
        rows.append({
            "tool": "megatron-mod", "workers": workers, "documents": s["documents"],
            "tokens": tokens, "wall_s": wall, "docs_per_s": s["documents"] / wall,
            "tokens_per_s": tokens / wall, "mb_per_s": size / 1e6 / wall, "peak_rss_mib": peak,
        })  # fmt: skip
        print(f"megatron-mod workers={workers}: {wall:.1f} s, peak {peak:.0f} MiB")
    a, b = (Path(str(ours[w]) + "_text_document.bin") for w in args.workers[:2])
    identical = a.read_bytes() == b.read_bytes() if len(args.workers) > 1 else None

    mlm_note = "not run: pass --megatron-lm GIT_DIR (a Megatron-LM clone) to compare"
    mlm_identical = None
    if args.megatron_lm:
        script, info = extract_megatron_lm(args.megatron_lm, tmp / "mlm")
        mlm_note = info
        if script is not None:
            mlm_env = dict(env, PYTHONPATH=f"{tmp / 'mlm' / 'deps'}:{REPO}")
            for workers in args.workers:
                prefix = tmp / f"mlm_w{workers}"
                cmd = [sys.executable, str(script), *common, "--output-prefix", str(prefix),
                       "--workers", str(workers), "--log-interval", "100000000"]  # fmt: skip
                wall, peak, res = run_measured(cmd, mlm_env)
                if res.returncode != 0:
                    last = [ln for ln in res.stderr.strip().splitlines() if ln.strip()][-1:]
                    mlm_note = f"Megatron-LM {info} failed to run here: {' '.join(last)}"
                    print(mlm_note)
                    break
                out = Path(str(prefix) + "_text_document.bin")
                mlm_identical = (
                    out.read_bytes() == Path(str(ours[workers]) + "_text_document.bin").read_bytes()
                )
                rows.append({
                    "tool": f"Megatron-LM {info}", "workers": workers, "documents": n_docs,
                    "tokens": out.stat().st_size // 2, "wall_s": wall,
                    "docs_per_s": n_docs / wall, "tokens_per_s": out.stat().st_size / 2 / wall,
                    "mb_per_s": size / 1e6 / wall, "peak_rss_mib": peak,
                })  # fmt: skip
                mlm_note = f"Megatron-LM {info} ran on the same input and tokenizer"

    header = "| tool | workers | docs/s | tokens/s | MB/s | wall s | peak PSS MiB |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['tool']} | {r['workers']} | {r['docs_per_s']:,.0f} | {r['tokens_per_s']:,.0f} | "
            f"{r['mb_per_s']:.2f} | {r['wall_s']:.1f} | {r['peak_rss_mib']:.0f} |"
        )
    table = "\n".join(lines)
    print()
    print(table)
    print(f"\n1 vs 2 workers byte-identical: {identical}; Megatron-LM: {mlm_note}")
    result = {
        "cpu": cpu_name(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "load_average_at_end": os.getloadavg(), "corpus_mb": size / 1e6, "documents": n_docs,
        "tokenizer": "byte-level BPE, vocab 8192, trained locally", "rows": rows,
        "one_vs_two_workers_identical": identical, "megatron_lm": mlm_note,
        "megatron_lm_identical_output": mlm_identical, "table_markdown": table,
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
