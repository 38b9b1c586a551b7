"""DHO2's distribution modes under real ``horovodrun --gloo`` processes (tests/parallel/)."""

from __future__ import annotations

import pytest

from tests.helpers.launch import REPO, run_horovod

SCRIPT = REPO / "tests/parallel/modes_check.py"

pytestmark = pytest.mark.parallel


@pytest.mark.parametrize("np_,args,expect", [
    (2, ("sharded",), "sharded P=2"),
    (3, ("sharded",), "sharded P=3"),
    (2, ("replicated",), "replicated P=2"),
    (2, ("auto",), "auto P=2 ['sharded', 'replicated']"),
    (2, ("memory",), "memory P=2"),
    (4, ("memory",), "memory P=4"),
    (2, ("faithful",), "faithful P=2"),
    (3, ("pipelined", "1"), "pipelined P=3 P_C=1"),
    (4, ("pipelined", "2"), "pipelined P=4 P_C=2"),
    (2, ("admm",), "admm P=2"),
    (3, ("admm",), "admm P=3"),
    (2, ("misconfig",), "misconfig P=2"),
])
def test_mode_against_single_process_reference(np_, args, expect):
    proc = run_horovod(SCRIPT, np_, args=args, timeout=300)
    assert f"MODES_CHECK_OK {expect}" in proc.stdout
    if args[0] == "misconfig":
        # Every rank raised all five errors itself (no rank hung waiting for another).
        for rank in range(np_):
            assert f"[{rank}]<stdout>:rank {rank} caught 5:" in proc.stdout
        assert "`curvature_ranks` must leave at least one update rank" in proc.stdout
        assert "`tau` must be a positive integer" in proc.stdout


@pytest.mark.slow
def test_every_mode_trains_mnist1d_within_two_points_of_single_process():
    proc = run_horovod(REPO / "tests/parallel/modes_mnist1d_check.py", 2, args=("15",),
                       timeout=900)
    assert "MNIST1D_MODES_OK epochs=15" in proc.stdout
    for label in ("sharded", "faithful", "pipelined", "admm", "single"):
        assert f"MODE_ACCURACY {label} " in proc.stdout
