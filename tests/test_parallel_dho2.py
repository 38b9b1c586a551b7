"""DHO2 under real ``horovodrun --gloo`` processes, compared with a single-process run."""

from __future__ import annotations

import pytest

from tests.helpers.launch import REPO, run_horovod


@pytest.mark.parallel
@pytest.mark.parametrize("base", ["adam", "momentum"])
def test_two_ranks_equal_single_process_on_union_of_batches(base):
    proc = run_horovod(REPO / "tests/parallel/dho2_data_parallel_check.py", np=2, args=(base,),
                       timeout=240)
    assert "DHO2_DATA_PARALLEL_OK P=2" in proc.stdout
