"""Prioritized SGD under real ``horovodrun --gloo`` processes: the three scripts in
tests/parallel/ run in one launch (tests/parallel/run_scripts.py)."""

from __future__ import annotations

import pytest

from tests.helpers.launch import REPO, run_horovod

pytestmark = pytest.mark.parallel

#: script -> (the tag of its summary line, how many tests it runs)
SCRIPTS = {"prioritized_global.py": ("PRIORITIZED_GLOBAL", 7),
           "prioritized_fit.py": ("PRIORITIZED_FIT", 3),
           "prioritized_fit_dho2.py": ("PRIORITIZED_DHO2_FIT", 1)}


@pytest.fixture(scope="module")
def prioritized_run() -> str:
    args = [arg for i, script in enumerate(SCRIPTS) for arg in (["++"] if i else []) + [script]]
    return run_horovod(REPO / "tests" / "parallel" / "run_scripts.py", np=2, args=args,
                       timeout=480).stdout


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_two_ranks(prioritized_run: str, script: str) -> None:
    tag, tests = SCRIPTS[script]
    lines = [line for line in prioritized_run.splitlines() if f"{tag} " in line]
    assert len(lines) == 2, prioritized_run[-4000:]  # one summary line per rank
    for line in lines:
        assert line.split(tag, 1)[1].strip() == f"OK P=2 ran={tests} skipped=0", line
