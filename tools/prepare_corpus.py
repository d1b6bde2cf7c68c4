"""Preprocess every source of a corpus config and write the Megatron blend.

    python tools/prepare_corpus.py --config examples/corpus/modification_9src.yaml

Prints a table of sources (documents, tokens, natural share, blend weight), the ``--data-path``
string, and writes ``{output_dir}/blend.txt`` for ``--data-args-path`` (and ``blend.json``).
Sources whose outputs are up to date are skipped. See docs/data.md.
"""

from __future__ import annotations

import argparse
import sys

from megatron_mod.data.corpus import format_table, load_corpus_config, prepare_corpus
from megatron_mod.errors import USER_ERRORS, report


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="corpus YAML")
    p.add_argument(
        "--root",
        default=None,
        help="directory relative paths resolve against (default: the config's)",
    )
    p.add_argument("--force", action="store_true", help="reprocess up-to-date sources too")
    p.add_argument("--workers", type=int, default=None, help="override the config's workers")
    return p.parse_args(argv)  # fmt: skip


def main(argv=None) -> int:
    args = get_args(argv)
    try:
        config = load_corpus_config(args.config)
        results, data_path, args_path = prepare_corpus(
            config, root=args.root, force=args.force, workers=args.workers
        )
    except USER_ERRORS as e:
        return report(e)
    print(format_table(results))
    print(f"\n--data-args-path {args_path}")
    print(f"--data-path {data_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
