"""DHO2 under real ``horovodrun --gloo`` processes, compared with a single-process run."""

from __future__ import annotations

import pytest

from tests.helpers.launch import REPO, run_horovod


@pytest.mark.parallel
@pytest.mark.parametrize("base,mode,layout", [("adam", "sharded", "sharded"),
                                              ("momentum", "sharded", "sharded"),
                                              ("adam", "auto", "replicated")])
def test_two_ranks_equal_single_process_on_union_of_batches(base, mode, layout):
    proc = run_horovod(REPO / "tests/parallel/dho2_data_parallel_check.py", np=2,
                       args=(base, mode), timeout=240)
    assert f"DHO2_DATA_PARALLEL_OK P=2 mode={layout}" in proc.stdout
