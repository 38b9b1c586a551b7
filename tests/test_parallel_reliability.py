"""Reliability under real ``horovodrun --gloo``: mismatch detection, NaN batches, re-sharding."""

from __future__ import annotations

import time

import pytest

from tests.helpers.launch import REPO, run_horovod

SCRIPT = REPO / "tests/parallel/reliability_check.py"
pytestmark = pytest.mark.parallel


def test_different_model_widths_error_on_every_rank_within_60_seconds():
    start = time.monotonic()
    proc = run_horovod(SCRIPT, 2, args=("mismatch",), timeout=120)
    assert time.monotonic() - start < 60
    for rank in (0, 1):
        assert f"rank {rank} MISMATCH_ERROR DHO2 ranks disagree" in proc.stdout


def test_nan_batch_on_one_rank_is_skipped_by_every_rank():
    proc = run_horovod(SCRIPT, 2, args=("poisoned",), timeout=180)
    for layout in ("mode=sharded base=momentum", "mode=replicated base=momentum",
                   "mode=sharded base=adam"):
        assert proc.stdout.count(f"POISONED_OK {layout} skipped=1") == 2


@pytest.mark.parametrize("ranks", [1, 2])
def test_fifteen_steps_checkpoint_new_process_fifteen_equal_thirty_straight(tmp_path, ranks):
    """sharded, replicated and admm: final weights and eigenpairs agree with an uninterrupted
    run (1e-6)."""
    for stage in ("straight", "first"):
        run_horovod(SCRIPT, ranks, args=(stage, str(tmp_path)), timeout=240)
    proc = run_horovod(SCRIPT, ranks, args=("resume", str(tmp_path), "sharded,replicated,admm"),
                       timeout=240)
    for mode in ("sharded", "replicated", "admm"):
        assert proc.stdout.count(f"RESUME_OK mode={mode} P={ranks} from={ranks}") == ranks


def test_checkpoint_written_with_two_ranks_resumes_with_one_and_three(tmp_path):
    """The sharded state is re-partitioned (the replicated one loaded whole); the loss
    trajectory matches np=2's (1e-5)."""
    for stage in ("straight", "first"):
        run_horovod(SCRIPT, 2, args=(stage, str(tmp_path)), timeout=240)
    for np_ in (1, 3):
        proc = run_horovod(SCRIPT, np_, args=("resume", str(tmp_path), "sharded,replicated"),
                           timeout=240)
        for mode in ("sharded", "replicated"):
            assert proc.stdout.count(f"RESUME_OK mode={mode} P={np_} from=2") == np_
