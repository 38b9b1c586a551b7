"""Launch the curvature checks under horovodrun: sharded Lanczos and the warm refresh
(tests/parallel/lanczos_sharded_check.py) and the adaptive schedule
(tests/parallel/refresh_schedule_check.py)."""

from __future__ import annotations

import pytest

from tests.helpers.launch import REPO, run_horovod

SCRIPT = REPO / "tests" / "parallel" / "lanczos_sharded_check.py"
OK_LINE = "lanczos_sharded_check OK"

pytestmark = pytest.mark.parallel


@pytest.mark.parametrize("np_", [2, 3])
def test_sharded_lanczos_equals_single_process_on_mean_operator(np_: int) -> None:
    proc = run_horovod(SCRIPT, np_, timeout=240)
    assert proc.returncode == 0
    ok_lines = [line for line in proc.stdout.splitlines() if OK_LINE in line]
    assert len(ok_lines) == 1, proc.stdout[-4000:]
    assert f"P={np_}," in ok_lines[0]
    if np_ == 3:
        assert "process set [1, 2]" in ok_lines[0]


SCHEDULE_SCRIPT = REPO / "tests" / "parallel" / "refresh_schedule_check.py"
SCHEDULE_OK = "refresh_schedule_check OK"


def test_adaptive_schedule_decides_and_communicates_alike_on_every_rank() -> None:
    """P = 2, a different curvature batch per rank, every mode that accepts the adaptive
    schedule: identical staleness decisions, refresh steps and collective calls on both ranks,
    the schedule's rule kept, a requested refresh honoured, Lanczos first and warm after."""
    proc = run_horovod(SCHEDULE_SCRIPT, 2, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    ok_lines = [line for line in proc.stdout.splitlines() if SCHEDULE_OK in line]
    assert len(ok_lines) == 1 and "P=2," in ok_lines[0], proc.stdout[-4000:]
