"""DHO2's distribution modes under real ``horovodrun --gloo`` processes (tests/parallel/)."""

from __future__ import annotations

import re

import pytest

from tests.helpers.launch import REPO, run_horovod

SCRIPT = REPO / "tests/parallel/modes_check.py"

pytestmark = pytest.mark.parallel


#: The checks of modes_check.py, in the order one launch runs them.
CHECKS = ("comm", "sharded", "replicated", "auto", "memory", "faithful", "admm", "pipelined",
          "misconfig")
#: P_C of the pipelined check at world size P (P − P_C ≥ 1 update ranks).
CURVATURE_RANKS = {2: 1, 3: 1, 4: 2}


@pytest.mark.parametrize("np_", [2, 3, pytest.param(4, marks=pytest.mark.slow)])
def test_every_mode_against_single_process_reference(np_):
    """One horovodrun at world size P runs every mode's check in sequence (one Horovod start-up);
    each check prints its own OK line, so a missing line names the mode that failed."""
    pc = CURVATURE_RANKS[np_]
    proc = run_horovod(SCRIPT, np_, args=("--curvature-ranks", str(pc), *CHECKS), timeout=1200,
                       check=False)
    out = proc.stdout + proc.stderr
    expect = {name: f"{name} P={np_}" for name in CHECKS}
    expect["pipelined"] = f"pipelined P={np_} P_C={pc}"
    passed = [name for name in CHECKS
              if re.search(rf"MODES_CHECK_OK {re.escape(expect[name])}\b", proc.stdout)]
    failed = re.findall(rf"MODES_CHECK_FAIL (\w+) P={np_} rank=(\d+)", out)
    missing = [name for name in CHECKS if name not in passed]
    assert not missing and proc.returncode == 0, (
        f"P={np_}: no OK line for {missing} (failed: {sorted(set(failed))}, "
        f"exit {proc.returncode})\n{out[-8000:]}")
    # misconfig: every rank raised all five errors itself (no rank hung waiting for another).
    for rank in range(np_):
        assert f"[{rank}]<stdout>:rank {rank} caught 5:" in proc.stdout
    assert "`curvature_ranks` must leave at least one update rank" in proc.stdout
    assert "`tau` must be a positive integer" in proc.stdout
    for line in re.findall(r"MODES_CHECK_OK .*", proc.stdout):
        print(line)


@pytest.mark.slow
def test_every_mode_trains_mnist1d_within_two_points_of_single_process():
    proc = run_horovod(REPO / "tests/parallel/modes_mnist1d_check.py", 2, args=("15",),
                       timeout=900)
    assert "MNIST1D_MODES_OK epochs=15" in proc.stdout
    for label in ("sharded", "faithful", "pipelined", "admm", "single"):
        assert f"MODE_ACCURACY {label} " in proc.stdout
