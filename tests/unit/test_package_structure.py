"""The package keeps the shape its maintainers agreed on.

* the distribution modes use only the optimizer's public members;
* mode-specific behaviour lives in the modes: no ``mode == ...`` comparison outside them;
* no block of six or more (non-blank) lines is repeated inside ``dho2_tf/``;
* only ``dho2_tf/distributed/`` and the run level import Horovod, and the optimizer, the modes
  and the communication layer do not import the run level (``dho2_tf/training/``);
* the layout section of docs/architecture.md names every module and folder of the package, and
  nothing that does not exist.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "dho2_tf"


def sources(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def test_modes_read_no_underscore_member_of_the_optimizer() -> None:
    pattern = re.compile(r"\bopt(?:imizer)?\._[A-Za-z]")
    offenders = [f"{p.relative_to(REPO)}:{i}: {line.strip()}"
                 for p in sources(PACKAGE / "modes")
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_no_mode_comparison_outside_the_modes() -> None:
    """``mode == "x"`` / ``mode != "x"`` / ``mode in (...)`` belong in dho2_tf/modes/."""
    pattern = re.compile(r"\bmode\s*(?:==|!=|\bin\b\s*[(\[{])")
    files = [p for p in sources(PACKAGE) + sources(REPO / "jobs")
             if PACKAGE / "modes" not in p.parents]
    offenders = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in files
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if pattern.search(line.split("#")[0])]
    assert offenders == []


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, whitespace-normalised text) of the non-blank lines outside docstrings."""
    text = path.read_text()
    docstring_lines: set[int] = set()
    for node in ast.walk(ast.parse(text)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str):
            docstring_lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    return [(i, " ".join(line.split())) for i, line in enumerate(text.splitlines(), 1)
            if line.strip() and i not in docstring_lines]


def _repeated_blocks(files: list[Path], size: int = 6) -> list[str]:
    """Places where the same ``size`` consecutive code lines occur twice (imports aside)."""
    seen: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for path in files:
        lines = _code_lines(path)
        for start in range(len(lines) - size + 1):
            window = tuple(text for _, text in lines[start:start + size])
            if all(t.startswith(("from ", "import ", ")")) for t in window):
                continue
            seen[window].append(f"{path.relative_to(REPO)}:{lines[start][0]}")
    return [" and ".join(places) for places in seen.values() if len(places) > 1]


def test_no_block_of_six_lines_is_repeated_in_the_package() -> None:
    assert _repeated_blocks(sources(PACKAGE)) == []


def test_the_repeated_block_check_finds_a_copy(tmp_path: Path) -> None:
    block = "\n".join(f"value_{i} = compute({i})" for i in range(6))
    (tmp_path / "a.py").write_text(f"x = 1\n{block}\n")
    (tmp_path / "b.py").write_text(f"{block}\ny = 2\n")
    global REPO
    saved, REPO = REPO, tmp_path
    try:
        found = _repeated_blocks([tmp_path / "a.py", tmp_path / "b.py"])
    finally:
        REPO = saved
    assert found == ["a.py:2 and b.py:1"]


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_layers_import_downwards_only() -> None:
    training = PACKAGE / "training"
    for path in sources(PACKAGE):
        imported = _imports(path)
        if training not in path.parents:
            assert not any(n.startswith("dho2_tf.training") for n in imported), path
        if training not in path.parents and PACKAGE / "distributed" not in path.parents:
            assert not any(n.split(".")[0] == "horovod" for n in imported), path


def _layout_entries() -> list[str]:
    """The first word of every unindented line of the fenced block after "## Layout"."""
    text = (REPO / "docs" / "architecture.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    return [line.split()[0] for line in block.splitlines() if line and not line[0].isspace()]


def test_layout_matches_the_package() -> None:
    listed = _layout_entries()
    for entry in listed:
        assert (REPO / entry.rstrip("/")).exists(), \
            f"docs/architecture.md layout lists missing {entry}"
    package_entries = {f"{p.relative_to(REPO)}" for p in PACKAGE.glob("*.py")
                       if p.name != "__init__.py"}
    package_entries |= {f"{p.relative_to(REPO)}/" for p in PACKAGE.iterdir()
                        if p.is_dir() and (p / "__init__.py").exists()}
    missing = sorted(package_entries - set(listed))
    assert missing == [], f"docs/architecture.md layout misses {missing}"
