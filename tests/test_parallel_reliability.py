"""Reliability under real ``horovodrun --gloo``: mismatch detection, NaN batches, re-sharding.

Launches: at P = 2 one launch of tests/parallel/reliability_check.py runs the uninterrupted and
the first-half runs, the mismatch and the NaN-batch checks, and a second (new processes) resumes
from its checkpoints (at P = 1 the same two without the checks; the slow test resumes the P = 2
checkpoints on 1 and 3 ranks). tests/parallel/consistency_run.py runs the ranks that disagree on the run, the job
with rank-dependent flags and the two-rank checkpoint in one launch, and every resume or data
that must stop the ranks in a second.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers.job_output import job_lines, rank_output, run_lines
from tests.helpers.launch import REPO, run_horovod

SCRIPT = REPO / "tests/parallel/reliability_check.py"
CONSISTENCY = REPO / "tests/parallel/consistency_run.py"
pytestmark = pytest.mark.parallel


# ------------------------------------------------ reliability_check.py: one launch per world size
@pytest.fixture(scope="module")
def checks_run(tmp_path_factory):
    """``checks_run(P)``: (folder, first launch) at world size P, launched on first use. It
    writes the uninterrupted reference and the step-15 checkpoints of sharded, replicated and
    admm to the folder (at P = 2 it then runs the mismatch and the NaN-batch checks)."""
    runs = {}

    def run(np_):
        if np_ not in runs:
            folder = tmp_path_factory.mktemp(f"reliability_p{np_}")
            stages = ("straight", str(folder), "first", str(folder))
            if np_ == 2:   # after the checkpoints: the NaN check lowers Adam's in-place size
                stages += ("mismatch", "poisoned")
            runs[np_] = folder, run_horovod(SCRIPT, np_, args=stages, timeout=480)
        return runs[np_]

    return run


def test_different_model_widths_error_on_every_rank_within_60_seconds(checks_run):
    proc = checks_run(2)[1]
    for tag, limit in (("MISMATCH_SECONDS", 60), ("FIT_BATCH_SECONDS", 30)):
        seconds = [float(line.split()[-1]) for line in proc.stdout.splitlines() if tag in line]
        assert len(seconds) == 2 and max(seconds) < limit, (tag, seconds)
    for rank in (0, 1):  # the differing keys are named, not the whole fingerprint dumped
        assert (f"rank {rank} MISMATCH_ERROR DHO2 ranks disagree on variable[0], variable[1], "
                "variable[2] (every rank must use the same value)") in proc.stdout
    for rank in (0, 1):
        assert ('  variable[0]: rank 0: [[10, 24], "float32"]; rank 1: [[10, 32], "float32"]'
                in rank_output(proc.stdout, rank))
    for rank in (0, 1):  # fit with batch 16 on rank 0, 32 on rank 1 (Python API)
        assert (f"rank {rank} FIT_BATCH_ERROR DHO2 ranks disagree on fit.steps (every rank "
                "must use the same value):") in proc.stdout
        assert "  fit.steps: rank 0: 4; rank 1: 2" in rank_output(proc.stdout, rank)


def test_nan_batch_on_one_rank_is_skipped_by_every_rank(checks_run):
    """Also: after a wrong c, both ranks' guards trip at the same steps (same launch)."""
    proc = checks_run(2)[1]
    for layout in ("mode=sharded base=momentum", "mode=replicated base=momentum",
                   "mode=sharded base=adam"):
        assert proc.stdout.count(f"POISONED_OK {layout} skipped=1") == 2
    for mode in ("sharded", "replicated"):
        trips = [line.split("trips=")[1] for line in proc.stdout.splitlines()
                 if f"GUARD_OK mode={mode} " in line]
        assert len(trips) == 2 and trips[0] == trips[1], proc.stdout


@pytest.mark.parametrize("ranks", [1, 2])
def test_fifteen_steps_checkpoint_new_process_fifteen_equal_thirty_straight(checks_run, ranks):
    """sharded, replicated and admm: final weights and eigenpairs agree with an uninterrupted
    run (1e-6)."""
    folder = checks_run(ranks)[0]
    proc = run_horovod(SCRIPT, ranks, args=("resume", str(folder), "sharded,replicated,admm"),
                       timeout=240)
    for mode in ("sharded", "replicated", "admm"):
        assert proc.stdout.count(f"RESUME_OK mode={mode} P={ranks} from={ranks}") == ranks


@pytest.mark.slow
def test_checkpoint_written_with_two_ranks_resumes_with_one_and_three(checks_run):
    """The sharded state is re-partitioned (the replicated one loaded whole); the loss
    trajectory matches np=2's (1e-5)."""
    folder = checks_run(2)[0]
    for np_ in (1, 3):
        proc = run_horovod(SCRIPT, np_, args=("resume", str(folder), "sharded,replicated"),
                           timeout=240)
        for mode in ("sharded", "replicated"):
            assert proc.stdout.count(f"RESUME_OK mode={mode} P={np_} from=2") == np_


# ----------------------------------------- consistency_run.py: ranks that disagree on the run
# case -> (key that must be named, the line giving each rank's value)
RUN_CASES = {
    "batch_size": "batch_size: rank 0: 50; rank 1: 25",
    "num_samples": "num_samples: rank 0: 400; rank 1: 600",
    "weight_decay": "weight_decay: rank 0: 0.0003; rank 1: 0.0",
    "learning_rate": "learning_rate: rank 0: 0.001; rank 1: 0.002",
    "k": "dho2.k: rank 0: 2; rank 1: 3",
}
JOB_FLAGS = ("--optimizer", "adam", "--learning-rate", "1e-3", "--num-samples", "500",
             "--epochs", "2", "--schedule", "cosine", "--verbose", "0")
#: The runs of the first consistency launch, in order (after the API check).
RANK_DEPENDENT_MODE, RANK_DEPENDENT_BATCH, TWO_RANK_CHECKPOINT, DIFFERENT_DATA = range(4)


@pytest.fixture(scope="module")
def disagreement_run(tmp_path_factory):
    """One launch: only rank 1 asks for the pipelined mode, through DHO2's own communicator
    (``api``) and then through jobs/train.py; the job's ranks disagree on the batch size; a
    checkpoint written by 2 ranks x batch 50 after epoch 1 of 2 (the target stops it); CIFAR
    files of the same shape but other content on each rank; then the RUN_CASES, ranks whose
    configurations differ in one field calling ``train``.

    Returns (the launch, the checkpoint folder)."""
    tmp = tmp_path_factory.mktemp("two_ranks")
    folder = tmp / "ckpt"
    _write_cifar(tmp / "cifar0", seed=0)
    _write_cifar(tmp / "cifar1", seed=1)
    proc = run_horovod(CONSISTENCY, 2, args=(
        "api", "job", "--optimizer", "dho2", "--num-samples", "400", "--epochs", "1",
        "--batch-size", "50", "--verbose", "0", "r1:--mode", "r1:pipelined",
        "++", "--optimizer", "adam", "--learning-rate", "1e-3", "--num-samples", "400",
        "--epochs", "1", "--schedule", "constant", "--verbose", "0",
        "r0:--batch-size", "r0:50", "r1:--batch-size", "r1:25",
        "++", *JOB_FLAGS, "--batch-size", "50", "--checkpoint-dir", str(folder),
        "--target-loss", "100",
        "++", "--dataset", "cifar10", "--model", "resnet20", "--optimizer", "adam",
        "--batch-size", "2", "--epochs", "1", "--verbose", "0",
        "--data-dir", str(tmp / "cifar{rank}"), "--cases", *RUN_CASES), timeout=480)
    return proc, folder


@pytest.fixture(scope="module")
def two_rank_checkpoint(disagreement_run):
    """A checkpoint written by 2 ranks x batch 50 after epoch 1 of 2 (the target stops it)."""
    proc, folder = disagreement_run
    for rank in (0, 1):
        assert f"rank {rank} JOB_STATUS 0" in run_lines(proc.stdout, rank, TWO_RANK_CHECKPOINT)
    return folder


def test_ranks_disagreeing_on_the_run_error_on_every_rank_within_30_seconds_naming_the_key(
        disagreement_run):
    """Batch size, samples, weight decay, baseline lr and DHO2's k differ between the two
    ranks: `train` raises on both before the first training collective, naming the key."""
    proc = disagreement_run[0]
    for rank in (0, 1):
        blocks = "\n".join(rank_output(proc.stdout, rank)).split("CONSISTENCY_ERROR ")[1:]
        assert [b.split()[0] for b in blocks] == [f"case={c}" for c in RUN_CASES], proc.stdout
        for block, (case, line) in zip(blocks, RUN_CASES.items()):
            lines = block.splitlines()
            assert lines[1].startswith("Training run ranks disagree on "), block
            key = line.split(":", 1)[0]
            assert key in lines[1].split(" on ", 1)[1].split(" (")[0].split(", "), block
            assert f"  {line}" in lines, block
            assert float(block.split("seconds=", 1)[1].split()[0]) < 30


def test_train_job_with_rank_dependent_flags_exits_2_on_every_rank(disagreement_run):
    """Only rank 1 asks for the pipelined mode, first through DHO2's own communicator, then
    through jobs/train.py: Horovod's process sets would differ, so both ranks stop with one
    message naming each rank's sets and mode, before Horovod registers any set (no Gloo
    error). Then the job's ranks disagree on the batch size: the same kind of message."""
    proc = disagreement_run[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "mismatching numbers of process sets" not in proc.stdout + proc.stderr
    for rank in (0, 1):
        lines = job_lines(proc, rank)
        api = lines.index(f"rank {rank} API_ERROR")
        assert lines[api + 1:api + 4] == [
            "Horovod start-up ranks disagree on process_sets, mode (every rank must use the "
            "same value):", "  process_sets: rank 0: []; rank 1: [[0], [1]]",
            '  mode: rank 0: "replicated"; rank 1: "pipelined"'], lines
        for run in (RANK_DEPENDENT_MODE, RANK_DEPENDENT_BATCH):
            assert [line for line in run_lines(proc.stdout, rank, run) if "JOB_STATUS" in line] \
                == [f"rank {rank} JOB_STATUS 2"], lines
        first_seconds = float(next(line for line in lines if "JOB_SECONDS" in line).split()[-1])
        assert first_seconds < 20, lines
        mode = run_lines(proc.stderr, rank, RANK_DEPENDENT_MODE)
        assert (f"train.py: error (rank {rank}): Horovod start-up ranks disagree on "
                "process_sets, mode (every rank must use the same value):") in mode, mode
        assert "  process_sets: rank 0: []; rank 1: [[0], [1]]" in mode, mode
        assert '  mode: rank 0: "auto"; rank 1: "pipelined"' in mode, mode
        batch = run_lines(proc.stderr, rank, RANK_DEPENDENT_BATCH)
        assert any(line.startswith(f"train.py: error (rank {rank}): Training run ranks "
                                   "disagree on ") for line in batch), batch
        assert "  batch_size: rank 0: 50; rank 1: 25" in batch, batch


def _one_rank_job(*flags):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("HOROVOD_RANK", None)
    return subprocess.run([sys.executable, str(REPO / "jobs/train.py"), *JOB_FLAGS, *flags],
                          capture_output=True, text=True, timeout=180, cwd=REPO, env=env)


def test_two_rank_checkpoint_resumes_on_one_rank_only_with_the_same_global_batch(
        two_rank_checkpoint, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(two_rank_checkpoint, folder)
    manifest = json.loads((folder / "checkpoint.json").read_text())
    assert (manifest["epoch"], manifest["step"], manifest["ranks"]) == (1, 4, 2)
    assert (manifest["run"]["global_batch"], manifest["run"]["steps_per_epoch"]) == (100, 4)
    # Same per-rank batch on one rank would halve the global batch: refused, with the fix.
    proc = _one_rank_job("--batch-size", "50", "--checkpoint-dir", str(folder), "--resume")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "  global_batch: checkpoint 100, this run 50" in proc.stderr
    assert "  steps_per_epoch: checkpoint 4, this run 8" in proc.stderr
    assert ("written by 2 rank(s) x batch_size 50 (global batch 100); on 1 training rank(s) "
            "pass --batch-size 100 to keep the global batch") in proc.stderr
    assert json.loads((folder / "checkpoint.json").read_text()) == manifest
    # With --batch-size 100 the global batch and the cosine schedule's steps are kept.
    proc = _one_rank_job("--batch-size", "100", "--checkpoint-dir", str(folder), "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert " ranks=1 epochs=2 " in proc.stdout
    resumed = json.loads((folder / "checkpoint.json").read_text())
    assert (resumed["epoch"], resumed["step"], resumed["ranks"]) == (2, 8, 1)
    assert (resumed["run"]["global_batch"], resumed["run"]["steps_per_epoch"]) == (100, 4)


# ------------------------------------- resumes and data that stop every rank: one more launch
#: The runs of the second consistency launch, in order.
CORRUPTED, NODE_LOCAL, WRONG_SHAPE = range(3)


@pytest.fixture(scope="module")
def resume_errors_run(two_rank_checkpoint, tmp_path_factory):
    """One launch resuming three copies of the two-rank checkpoint: rank 1's file cut short;
    node-local folders (one per rank: rank 0 sees the checkpoint, rank 1 an empty folder); a
    wrong shape in rank 1's file. Returns (the launch, the corrupted file, the node-local
    folder, the reshaped file, the checkpoint's name)."""
    tmp = tmp_path_factory.mktemp("resume_errors")
    name = json.loads((two_rank_checkpoint / "checkpoint.json").read_text())["name"]
    corrupted = tmp / "corrupted" / "ckpt"
    shutil.copytree(two_rank_checkpoint, corrupted)
    cut = corrupted / name / "rank_00001.npz"
    cut.write_bytes(cut.read_bytes()[:100])
    node_local = tmp / "node_local"
    shutil.copytree(two_rank_checkpoint, node_local / "rank0" / "ckpt")
    (node_local / "rank1" / "ckpt").mkdir(parents=True)
    reshaped = tmp / "reshaped" / "ckpt"
    shutil.copytree(two_rank_checkpoint, reshaped)
    wrong = reshaped / name / "rank_00001.npz"
    with np.load(wrong) as arrays:
        content = {key: arrays[key] for key in arrays.files}
    content["model/0"] = np.zeros((3, 5), np.float32)
    with open(wrong, "wb") as handle:
        np.savez(handle, **content)
    resume = (*JOB_FLAGS, "--batch-size", "50", "--resume", "--checkpoint-dir")
    proc = run_horovod(CONSISTENCY, 2, args=(
        "job", *resume, str(corrupted), "++", *resume, str(node_local / "rank{rank}" / "ckpt"),
        "++", *resume, str(reshaped)), timeout=240)
    return proc, cut, node_local, wrong, name


def run_output(proc, rank, run):
    """Rank ``rank``'s stdout and stderr lines of run ``run`` of a consistency launch."""
    return run_lines(proc.stdout, rank, run) + run_lines(proc.stderr, rank, run)


def test_a_corrupted_file_of_one_rank_stops_every_rank_naming_its_path(resume_errors_run):
    proc, victim = resume_errors_run[:2]
    for rank in (0, 1):
        lines = run_output(proc, rank, CORRUPTED)
        assert f"rank {rank} JOB_STATUS 2" in lines, lines
        assert any(line.startswith(f"train.py: error (rank {rank}): rank 1: Checkpoint file "
                                   f"{victim} is unreadable or corrupted") for line in lines), lines


# ------------------------------------------------------ ranks that must agree before resuming
def test_resume_on_storage_one_rank_does_not_see_stops_every_rank_within_seconds(
        resume_errors_run):
    """Node-local checkpoint folders (one per rank): rank 0 sees the checkpoint, rank 1 an
    empty folder. Both stop before loading data, naming what each rank saw (no hang)."""
    proc, _, node_local, _, name = resume_errors_run
    for rank in (0, 1):
        lines = run_output(proc, rank, NODE_LOCAL)
        assert f"rank {rank} JOB_STATUS 2" in lines, lines
        assert float(next(line for line in lines if "JOB_SECONDS" in line).split()[-1]) < 60
        assert (f"train.py: error (rank {rank}): Ranks disagree on the checkpoint to resume "
                f"from {node_local / f'rank{rank}' / 'ckpt'} (every rank must see the same one; "
                "put --checkpoint-dir on storage every rank shares):") in lines, lines
        (seen,) = [line for line in lines if line.startswith("  checkpoint: ")]
        assert re.fullmatch(rf'  checkpoint: rank 0: "{name} \(epoch 1, step 4, run '
                            r'[0-9a-f]{12}\)"; rank 1: "no checkpoint"', seen), seen


def test_a_wrong_shape_in_one_ranks_file_is_named_on_every_rank(resume_errors_run):
    proc, victim = resume_errors_run[0], resume_errors_run[3]
    for rank in (0, 1):
        lines = run_output(proc, rank, WRONG_SHAPE)
        assert f"rank {rank} JOB_STATUS 2" in lines, lines
        assert any(line.startswith(f"train.py: error (rank {rank}): rank 1: The checkpoint "
                                   f"{victim} has shape (3, 5) for model variable ")
                   for line in lines), lines


def _write_cifar(folder, seed):
    """CIFAR-10 python-pickle files of 2 training images per batch, content from ``seed``."""
    import pickle

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for file, rows in [(f"data_batch_{i}", 2) for i in range(1, 6)] + [("test_batch", 3)]:
        batch = {b"data": rng.integers(0, 256, (rows, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, rows)]}
        (folder / file).write_bytes(pickle.dumps(batch, protocol=2))


def test_ranks_given_different_data_of_the_same_shape_stop_with_one_message(disagreement_run):
    """Different CIFAR files of the same shape (same sizes, other content): exit 2 on every
    rank, naming the data's content hash, before training."""
    proc = disagreement_run[0]
    for rank in (0, 1):
        lines = run_output(proc, rank, DIFFERENT_DATA)
        assert f"rank {rank} JOB_STATUS 2" in lines, lines
        assert f"train.py: error (rank {rank}): Training run ranks disagree on training_data " \
               "(every rank must use the same value):" in lines, lines
        assert any(re.fullmatch(r'  training_data: rank 0: "[0-9a-f]{16}"; rank 1: '
                                r'"[0-9a-f]{16}"', line) for line in lines), lines
