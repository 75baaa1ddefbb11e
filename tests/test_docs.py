"""The documents the repository cites are in the repository, and the files they name exist.

A citation is any ``something.md`` path written in a source, build or documentation file (a
docstring's "see docs/contract.md", a Markdown link, a YAML comment). It must resolve from the
repository root or from the citing file's folder: a document kept outside the repository is a
dead reference for everyone who clones it.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".txt", ".tpl", ".cfg", ".ini", ".env"}
TEXT_NAMES = {"Makefile", "Dockerfile"}
#: ``.md`` names the product (or a benchmark) writes as output; they are not documents.
ARTIFACTS = {"model-card.md", "v2-pilot.md"}

SELF = "tests/test_docs.py"  # it writes example citations on purpose
CITATION = re.compile(r"(?<![\w/.~$<>*{}-])((?:\.\.?/)*(?:[\w.-]+/)*[\w.-]+\.md)\b")
BACKTICKED = re.compile(r"`([^`\s]+)`")


def repository_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / line for line in out.splitlines() if line]


def text_files() -> list[Path]:
    return [p for p in repository_files()
            if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.name in TEXT_NAMES)]


def cited_documents(path: Path) -> list[tuple[int, str]]:
    found = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        found += [(number, m.group(1)) for m in CITATION.finditer(line)]
    return found


def dead_citations(files: list[Path], root: Path = ROOT) -> list[str]:
    dead = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        if rel == SELF:
            continue
        for number, citation in cited_documents(path):
            if citation in ARTIFACTS:
                continue
            if (root / citation).exists() or (path.parent / citation).exists():
                continue
            dead.append(f"{rel}:{number}: {citation}")
    return dead


def test_every_cited_document_is_in_the_repository():
    assert dead_citations(text_files()) == []


def test_the_check_catches_a_document_kept_outside(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "algorithm.md").write_text("# the algorithm\n")
    (tmp_path / "ARCHITECTURE.md").write_text("see [the algorithm](docs/algorithm.md)\n")
    (tmp_path / "pkg").mkdir()
    citing = tmp_path / "pkg" / "planner.py"
    citing.write_text('"""Sources (../shared/PAPER.md stage 3, PAPER.md); see docs/algorithm.md,\n'
                      '../ARCHITECTURE.md and the model-card.md it writes."""\n')
    files = [citing, tmp_path / "ARCHITECTURE.md"]
    assert dead_citations(files, tmp_path) == ["pkg/planner.py:1: ../shared/PAPER.md", "pkg/planner.py:1: PAPER.md"]


TOP_LEVEL = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")}
DOCS = ["ARCHITECTURE.md", "README.md", "docs/algorithm.md", "docs/contract.md"]


def named_paths(text: str) -> list[str]:
    """Backticked repository paths: the first folder is a top-level folder of the repository."""
    return [t for t in BACKTICKED.findall(text)
            if "/" in t and t.split("/")[0] in TOP_LEVEL and not set(t) & set("<>*{}$")]


@pytest.mark.parametrize("doc", DOCS)
def test_every_file_a_document_names_exists(doc):
    missing = [p for p in named_paths((ROOT / doc).read_text()) if not (ROOT / p).exists()]
    assert missing == []


def test_architecture_walk_names_real_modules():
    """ARCHITECTURE.md walks through the code by file: at least the parser, the planner, both
    adapters, the trainer's stages and the storage are named, and (above) exist."""
    named = set(named_paths((ROOT / "ARCHITECTURE.md").read_text()))
    for path in ["operator/ratatouille_operator/validation.py", "operator/ratatouille_operator/planner.py",
                 "operator/ratatouille_operator/reconciler.py", "operator/ratatouille_operator/executor.py",
                 "trainer/ratatouille_trainer/stages.py", "trainer/ratatouille_trainer/storage.py"]:
        assert path in named
