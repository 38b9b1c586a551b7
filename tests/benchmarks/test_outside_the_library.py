"""The benchmarks stay outside the library: the ``dho2_tf`` distribution does not install
``benchmarks``, and no module of ``dho2_tf`` imports it."""

from __future__ import annotations

import ast
import configparser

from setuptools import find_packages

from benchmarks.common import REPO


def test_the_distribution_installs_dho2_tf_and_not_the_benchmarks():
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    include = config["options.packages.find"]["include"].split()
    packages = find_packages(where=str(REPO), include=include)
    assert "dho2_tf" in packages and "dho2_tf.training" in packages
    assert not [p for p in packages if p.split(".")[0] in {"benchmarks", "tests", "jobs"}]
    assert {"benchmarks", "benchmarks.scaling", "benchmarks.prioritized"} <= \
        set(find_packages(where=str(REPO)))          # a package, found when asked for


def test_no_module_of_the_library_imports_the_benchmarks():
    offenders = []
    for path in sorted((REPO / "dho2_tf").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names
                          if n.split(".")[0] == "benchmarks"]
    assert offenders == []
