"""Launch the sharded-Lanczos check (tests/parallel/lanczos_sharded_check.py) under horovodrun."""

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
