"""Scripts of ``jobs/`` loaded as modules, for tests of their functions and reports."""

from __future__ import annotations

import functools
import importlib.util
import sys
from types import ModuleType

from tests.helpers.launch import REPO


@functools.cache
def job(name: str) -> ModuleType:
    """``jobs/<name>.py`` as a module (``jobs/`` on the path while it loads its neighbours)."""
    spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(REPO / "jobs"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "jobs"))
    return module
