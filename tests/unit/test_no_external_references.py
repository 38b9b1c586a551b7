"""Citations stay inside the repository: no pointer to a text users cannot read.

Every file under dho2_tf/, jobs/, tests/ and docs/, plus README.md and BENCHMARKS.md,
is scanned for the phrases of citations into documents outside the repository (or into how the
work was organised), and every "docs/algorithm.md §N.M" citation must name a section heading
that exists in docs/algorithm.md.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCANNED_DIRS = ("dho2_tf", "jobs", "tests", "docs")
SCANNED_FILES = ("README.md", "BENCHMARKS.md")
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".txt", ".toml", ".cfg", ".json"}
ALGORITHM = REPO / "docs" / "algorithm.md"

# Built from pieces so this file does not match its own patterns.
FORBIDDEN = tuple("".join(parts) for parts in (
    ("reference", " §"),
    ("algorithm", " reference"),
    ("shared", "/"),
    ("issue", " 3"),
    ("text for", " the lead"),
    ("DESIGN", ".md"),
    ("STYLE", ".md"),
    ("horovod", "-notes"),
    ("prioritized", "-sgd.md"),
    ("dho2", "-algorithm.md"),
))
CITATION = re.compile(r"algorithm\.md\s*§\s*(\d+(?:\.\d+)*)"
                      r"(?:\s*(?:[–-]|,|and)\s*§?\s*(\d+(?:\.\d+)*))*")
SECTION_REF = re.compile(r"§\s*(\d+(?:\.\d+)*)")
HEADING = re.compile(r"^#{2,6}\s+(\d+(?:\.\d+)*)\.?\s", re.M)


def scanned_files() -> list[Path]:
    """The text files the acceptance rule covers (caches and binaries skipped)."""
    files = [REPO / name for name in SCANNED_FILES]
    for folder in SCANNED_DIRS:
        files += [p for p in sorted((REPO / folder).rglob("*"))
                  if p.is_file() and p.suffix in SUFFIXES and "__pycache__" not in p.parts]
    return [p for p in files if p.exists()]


def lines_of(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8", errors="replace").splitlines()


def algorithm_sections() -> set[str]:
    """Numbers of the numbered headings of docs/algorithm.md ("2", "2.1", ...)."""
    return set(HEADING.findall(ALGORITHM.read_text(encoding="utf-8")))


def test_scan_covers_the_tree():
    files = {p.relative_to(REPO).as_posix() for p in scanned_files()}
    assert {"README.md", "BENCHMARKS.md", "docs/algorithm.md",
            "dho2_tf/optimizer.py", "jobs/bench_scaling.py"} <= files
    assert len(files) > 50


def test_patterns_are_found():
    """The scan would catch each old phrase (checked on a sample line, case-insensitive)."""
    for pattern in FORBIDDEN:
        line = f"see the {pattern.upper()} text"
        assert [p for p in FORBIDDEN if p.lower() in line.lower()], pattern


def test_no_citation_outside_the_repository():
    me = Path(__file__).resolve()
    hits = []
    for path in scanned_files():
        if path.resolve() == me:
            continue
        for number, line in enumerate(lines_of(path), 1):
            low = line.lower()
            hits += [f"{path.relative_to(REPO)}:{number}: {pattern!r} in {line.strip()[:100]}"
                     for pattern in FORBIDDEN if pattern.lower() in low]
    assert not hits, "citations of texts outside the repository:\n" + "\n".join(hits)


def test_algorithm_md_has_numbered_sections():
    sections = algorithm_sections()
    # The topics the code cites: FOSI update, Lanczos, modes, window rule, ADMM, pipelined
    # hand-over, cost model, prioritized SGD, recipes.
    assert {str(i) for i in range(2, 11)} <= sections
    assert {"3.1", "3.3", "4.3", "5.1", "6.2", "7.2", "8.4", "9.4", "9.9", "10.1"} <= sections


def test_every_algorithm_citation_names_an_existing_section():
    sections = algorithm_sections()
    bad, cited = [], 0
    for path in scanned_files():
        for number, line in enumerate(lines_of(path), 1):
            for match in CITATION.finditer(line):
                for section in SECTION_REF.findall(match.group(0)):
                    cited += 1
                    if section not in sections:
                        bad.append(f"{path.relative_to(REPO)}:{number}: §{section} in "
                                   f"{line.strip()[:100]}")
    assert cited > 20
    assert not bad, "citations of sections docs/algorithm.md lacks:\n" + "\n".join(bad)


def test_citation_pattern_reads_lists_and_ranges():
    text = "see docs/algorithm.md §8.2–§8.3 and docs/algorithm.md §9.5, §9.6 (and §1)"
    found = [s for m in CITATION.finditer(text) for s in SECTION_REF.findall(m.group(0))]
    assert found == ["8.2", "8.3", "9.5", "9.6"]
