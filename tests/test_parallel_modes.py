"""DHO2's distribution modes under real ``horovodrun --gloo`` processes: the mode-correctness
suite (tests/parallel/modes_check.py).

One horovodrun per world size P runs every check in sequence (one Horovod start-up); each check
prints its own OK line and every test below asserts one line, so a failing test names the check.
The checks: HorovodComm's collectives against numpy; P ranks against one process on the union of
their batches for every base (sharded) and for ``auto`` (replicated); replicated against
sharded with its collectives; ``auto``'s layout choice; state memory per rank; faithful,
pipelined and admm; bad configurations; and at P = 3 the Keras optimizer contract of the
pipelined mode (tests/parallel/contract_pipelined.py; the other modes' contract runs in one
process, tests/unit/optimizer/test_contract.py).
"""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.helpers.launch import REPO, run_horovod
from tests.parallel.contract_pipelined import CHECKS as CONTRACT_CHECKS

SCRIPT = REPO / "tests/parallel/modes_check.py"

pytestmark = pytest.mark.parallel

#: The checks of modes_check.py, in the order one launch runs them (``contract`` at P = 3 only).
CHECKS = ("comm", "sharded", "replicated", "auto", "memory", "faithful", "admm", "pipelined",
          "misconfig")
#: P_C of the pipelined check at world size P (P − P_C ≥ 1 update ranks).
CURVATURE_RANKS = {2: 1, 3: 1, 4: 2}
WORLD_SIZES = [2, 3, pytest.param(4, marks=pytest.mark.slow)]
CONTRACT_RANKS = 3


def checks_at(np_: int) -> tuple[str, ...]:
    return CHECKS + (("contract",) if np_ == CONTRACT_RANKS else ())


@pytest.fixture(scope="module")
def modes_run():
    """``modes_run(P)``: the one horovodrun of every check at world size P (launched on first
    use, then shared by every test of this module at that P)."""
    runs: dict[int, subprocess.CompletedProcess] = {}

    def run(np_: int) -> subprocess.CompletedProcess:
        if np_ not in runs:
            pc = CURVATURE_RANKS[np_]
            runs[np_] = run_horovod(SCRIPT, np_, args=("--curvature-ranks", str(pc),
                                                       *checks_at(np_)),
                                    timeout=1200, check=False)
        return runs[np_]

    return run


def ok_line(proc: subprocess.CompletedProcess, np_: int, check: str) -> str:
    """Rank 0's ``MODES_CHECK_OK`` line of ``check``; fails with the output if missing."""
    lines = re.findall(rf"MODES_CHECK_OK ({re.escape(check)} P={np_}\b.*)", proc.stdout)
    out = proc.stdout + proc.stderr
    failed = sorted(set(re.findall(rf"MODES_CHECK_FAIL (\w+) P={np_} rank=(\d+)", out)))
    assert len(lines) == 1, (f"P={np_}: no OK line for {check} (failed: {failed}, "
                             f"exit {proc.returncode})\n{out[-8000:]}")
    return lines[0]


@pytest.mark.parametrize("np_", WORLD_SIZES)
def test_launch_ran_every_check_and_exited_cleanly(modes_run, np_):
    proc = modes_run(np_)
    for check in checks_at(np_):
        print(ok_line(proc, np_, check))
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.parametrize("np_", WORLD_SIZES)
@pytest.mark.parametrize("check", ["comm", "replicated", "auto", "memory", "faithful", "admm"])
def test_mode_check(modes_run, np_, check):
    ok_line(modes_run(np_), np_, check)


@pytest.mark.parametrize("np_", WORLD_SIZES)
def test_every_base_and_auto_equal_single_process_on_union_of_batches(modes_run, np_):
    line = ok_line(modes_run(np_), np_, "sharded")
    for layout in ("nesterov/sharded->sharded", "adam/sharded->sharded",
                   "momentum/sharded->sharded", "adam/auto->replicated"):
        assert f" {layout}" in line, line


@pytest.mark.parametrize("np_", WORLD_SIZES)
def test_pipelined_against_synchronous_refresh(modes_run, np_):
    line = ok_line(modes_run(np_), np_, "pipelined")
    assert line.startswith(f"pipelined P={np_} P_C={CURVATURE_RANKS[np_]} "), line


@pytest.mark.parametrize("np_", WORLD_SIZES)
def test_misconfiguration_raises_on_every_rank(modes_run, np_):
    proc = modes_run(np_)
    ok_line(proc, np_, "misconfig")
    # every rank raised all five errors itself (no rank hung waiting for another)
    for rank in range(np_):
        assert f"[{rank}]<stdout>:rank {rank} caught 5:" in proc.stdout
    assert "`curvature_ranks` must leave at least one update rank" in proc.stdout
    assert "`tau` must be a positive integer" in proc.stdout


@pytest.mark.parametrize("check", list(CONTRACT_CHECKS))
def test_pipelined_keras_contract(modes_run, check):
    """Ranks 0, 1 update, rank 2 computes curvature; every rank reports every contract check."""
    proc = modes_run(CONTRACT_RANKS)
    lines = re.findall(rf"^\[(\d)\]<stdout>:CONTRACT {check} (.*)$", proc.stdout, re.M)
    assert sorted(rank for rank, _ in lines) == [str(r) for r in range(CONTRACT_RANKS)], \
        proc.stdout[-4000:]
    failures = [f"rank {rank}: {status}" for rank, status in lines if status != "OK"]
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_every_mode_trains_mnist1d_within_two_points_of_single_process():
    proc = run_horovod(REPO / "tests/parallel/modes_mnist1d_check.py", 2, args=("15",),
                       timeout=900)
    assert "MNIST1D_MODES_OK epochs=15" in proc.stdout
    for label in ("sharded", "faithful", "pipelined", "admm", "single"):
        assert f"MODE_ACCURACY {label} " in proc.stdout
