"""The curvature checks under horovodrun: sharded Lanczos and the warm refresh
(tests/parallel/lanczos_sharded_check.py) at P = 2 and 3, and the adaptive schedule
(tests/parallel/refresh_schedule_check.py) at P = 2, in the same launch as Lanczos
(tests/parallel/run_scripts.py): one launch per world size."""

from __future__ import annotations

import pytest

from tests.helpers.launch import REPO, run_horovod

RUNNER = REPO / "tests" / "parallel" / "run_scripts.py"
OK_LINE = "lanczos_sharded_check OK"
SCHEDULE_OK = "refresh_schedule_check OK"
#: The scripts of the launch at each world size (Lanczos first: it registers process sets).
SCRIPTS = {2: ("lanczos_sharded_check.py", "++", "refresh_schedule_check.py"),
           3: ("lanczos_sharded_check.py",)}

pytestmark = pytest.mark.parallel


@pytest.fixture(scope="module")
def curvature_run():
    """``curvature_run(P)``: the stdout of the one launch at world size P (on first use)."""
    runs: dict[int, str] = {}

    def run(np_: int) -> str:
        if np_ not in runs:
            runs[np_] = run_horovod(RUNNER, np_, args=SCRIPTS[np_], timeout=600).stdout
        return runs[np_]

    return run


@pytest.mark.parametrize("np_", [2, 3])
def test_sharded_lanczos_equals_single_process_on_mean_operator(curvature_run, np_: int) -> None:
    stdout = curvature_run(np_)
    ok_lines = [line for line in stdout.splitlines() if OK_LINE in line]
    assert len(ok_lines) == 1, stdout[-4000:]
    assert f"P={np_}," in ok_lines[0]
    if np_ == 3:
        assert "process set [1, 2]" in ok_lines[0]


def test_adaptive_schedule_decides_and_communicates_alike_on_every_rank(curvature_run) -> None:
    """P = 2, a different curvature batch per rank, every mode that accepts the adaptive
    schedule: identical staleness decisions, refresh steps and collective calls on both ranks,
    the schedule's rule kept, a requested refresh honoured, Lanczos first and warm after."""
    stdout = curvature_run(2)
    ok_lines = [line for line in stdout.splitlines() if SCHEDULE_OK in line]
    assert len(ok_lines) == 1 and "P=2," in ok_lines[0], stdout[-4000:]
