"""Documentation that names files stays true when files move."""

from __future__ import annotations

import re

from tests.subprocess_utils import REPO


def test_change_map_names_existing_files():
    text = (REPO / "docs" / "design.md").read_text()
    section = text.split("## Change map", 1)[1]
    paths = re.findall(r"`((?:megatron_mod|tests|tools|benchmarks|scripts)/[\w./]+)`", section)
    assert len(paths) >= 15, paths
    missing = [p for p in paths if not (REPO / p).exists()]
    assert not missing, f"docs/design.md's change map names missing files: {missing}"
