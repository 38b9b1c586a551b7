"""Prioritized SGD under real ``horovodrun --gloo`` processes (scripts in tests/parallel/)."""

from __future__ import annotations

import pytest

from tests.helpers.launch import REPO, run_horovod

pytestmark = pytest.mark.parallel


@pytest.mark.parametrize("script, tag, tests", [
    ("prioritized_global.py", "PRIORITIZED_GLOBAL", 7),
    ("prioritized_fit.py", "PRIORITIZED_FIT", 3),
    ("prioritized_fit_dho2.py", "PRIORITIZED_DHO2_FIT", 1),
])
def test_two_ranks(script: str, tag: str, tests: int) -> None:
    proc = run_horovod(REPO / "tests" / "parallel" / script, np=2, timeout=240)
    lines = [line for line in proc.stdout.splitlines() if tag in line]
    assert len(lines) == 2, proc.stdout[-4000:]  # one summary line per rank
    for line in lines:
        assert line.split(tag, 1)[1].strip() == f"OK P=2 ran={tests} skipped=0", line
