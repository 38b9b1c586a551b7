"""The Keras optimizer contract for DHO2 ``mode="pipelined"``, on 3 real horovodrun processes
(2 update ranks, 1 curvature rank). The other modes run in one process:
``tests/unit/optimizer/test_contract.py``; this file checks the same properties with the same
numbers, through ``tests/parallel/contract_pipelined.py``.
"""

from __future__ import annotations

import re

import pytest

from tests.helpers.launch import REPO, run_horovod
from tests.parallel.contract_pipelined import CHECKS

pytestmark = pytest.mark.parallel

SCRIPT = REPO / "tests" / "parallel" / "contract_pipelined.py"
RANKS = 3


@pytest.fixture(scope="module")
def contract_run():
    """One horovodrun of every check (a DHO2 process set costs a Horovod start-up)."""
    return run_horovod(SCRIPT, RANKS, timeout=600).stdout


@pytest.mark.parametrize("check", list(CHECKS))
def test_pipelined_contract(contract_run, check):
    lines = re.findall(rf"^\[(\d)\]<stdout>:CONTRACT {check} (.*)$", contract_run, re.M)
    assert sorted(rank for rank, _ in lines) == [str(r) for r in range(RANKS)], contract_run[-4000:]
    failures = [f"rank {rank}: {status}" for rank, status in lines if status != "OK"]
    assert not failures, "\n".join(failures)
