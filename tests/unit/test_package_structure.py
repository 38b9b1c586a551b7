"""The package keeps the shape its maintainers agreed on.

* the package's module graph (every import, including those under ``TYPE_CHECKING`` and inside
  functions) has no cycle, and no mode module refers to the optimizer (class, module or
  instance): a mode works on its context and returns data;
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


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path: Path, name: str, modules: set[str]) -> set[str]:
    """The package modules ``path`` (module ``name``) imports, anywhere in its code: ``import
    a.b``, ``from a import b`` (module ``a.b`` when it is one, else ``a``), relative imports
    resolved."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                package = package[:len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            subs = [f"{base}.{alias.name}" for alias in node.names
                    if f"{base}.{alias.name}" in modules]
            targets = subs if len(subs) == len(node.names) else [base, *subs]
        out.update(target for target in targets if target in modules and target != name)
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module → the package modules it imports, for every module under ``root``."""
    paths = {_module_name(p, root): p for p in sources(root)}
    return {name: _imported_modules(path, name, set(paths)) for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of ``graph`` as [a, b, ..., a], or [] (depth-first search)."""
    state: dict[str, int] = {}          # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_the_package_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph(PACKAGE))
    assert cycle == [], "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_sees_type_checking_and_local_imports(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from pkg.sub.b import B\n")
    (package / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                  "    from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from ..c import C\n")
    (package / "c.py").write_text("import pkg.a\n")
    graph = import_graph(package)
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
    (package / "c.py").write_text("import json\n")
    assert find_cycle(import_graph(package)) == []


def optimizer_references(path: Path) -> list[str]:
    """Where ``path`` refers to the optimizer: the name or attribute ``DHO2``, ``opt`` or
    ``optimizer``, or an import of ``dho2_tf.optimizer`` or of ``DHO2``."""
    names = {"DHO2", "opt", "optimizer"}
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        hit = None
        if isinstance(node, ast.Name) and node.id in names:
            hit = node.id
        elif isinstance(node, ast.Attribute) and node.attr in names:
            hit = f".{node.attr}"
        elif isinstance(node, ast.arg) and node.arg in names:
            hit = f"argument {node.arg}"
        elif isinstance(node, ast.Import):
            hit = next((a.name for a in node.names if a.name.startswith("dho2_tf.optimizer")),
                       None)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.startswith("dho2_tf.optimizer") or module == "optimizer" or any(
                    a.name in ("DHO2", "optimizer") for a in node.names):
                hit = f"from {module} import ..."
        if hit is not None:
            found.append(f"{path.relative_to(REPO)}:{node.lineno}: {hit}")
    return found


def test_no_mode_module_refers_to_the_optimizer() -> None:
    offenders = [hit for p in sources(PACKAGE / "modes") for hit in optimizer_references(p)]
    assert offenders == []


def test_the_optimizer_reference_check_finds_one(tmp_path: Path) -> None:
    global REPO
    saved, REPO = REPO, tmp_path
    try:
        cases = {"a.py": "def f(opt):\n    return 1\n", "b.py": "x = self.opt.spec\n",
                 "c.py": "from dho2_tf.optimizer import DHO2\n",
                 "d.py": "from dho2_tf import DHO2\n", "e.py": "y = DHO2\n"}
        for name, code in cases.items():
            (tmp_path / name).write_text(code)
            assert optimizer_references(tmp_path / name), name
        (tmp_path / "f.py").write_text("def f(ctx):\n    return ctx.comm  # DHO2 in prose\n")
        assert optimizer_references(tmp_path / "f.py") == []
    finally:
        REPO = saved


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
