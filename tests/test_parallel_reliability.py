"""Reliability under real ``horovodrun --gloo``: mismatch detection, NaN batches, re-sharding."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers.launch import REPO, run_horovod

SCRIPT = REPO / "tests/parallel/reliability_check.py"
CONSISTENCY = REPO / "tests/parallel/consistency_run.py"
pytestmark = pytest.mark.parallel


def test_different_model_widths_error_on_every_rank_within_60_seconds():
    start = time.monotonic()
    proc = run_horovod(SCRIPT, 2, args=("mismatch",), timeout=180)
    # The launch also runs the fit-batch case; that one reports its own seconds.
    seconds = [float(line.split()[-1]) for line in proc.stdout.splitlines()
               if "FIT_BATCH_SECONDS" in line]
    assert len(seconds) == 2 and time.monotonic() - start - max(seconds) < 60
    assert max(seconds) < 30
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


# case -> (key that must be named, the line giving each rank's value)
RUN_CASES = {
    "batch_size": "batch_size: rank 0: 50; rank 1: 25",
    "num_samples": "num_samples: rank 0: 400; rank 1: 600",
    "weight_decay": "weight_decay: rank 0: 0.0003; rank 1: 0.0",
    "learning_rate": "learning_rate: rank 0: 0.001; rank 1: 0.002",
    "k": "k: rank 0: 2; rank 1: 3",
}


def rank_output(text, rank):
    """The lines horovodrun prefixed with ``[rank]<stdout>:`` / ``<stderr>:``, prefix removed."""
    out = []
    for line in text.splitlines():
        for stream in ("stdout", "stderr"):
            prefix = f"[{rank}]<{stream}>:"
            if line.startswith(prefix):
                out.append(line[len(prefix):])
    return out


def job_lines(proc, rank):
    """Rank ``rank``'s lines of stdout and stderr, prefix removed."""
    return rank_output(proc.stdout, rank) + rank_output(proc.stderr, rank)


def test_ranks_disagreeing_on_the_run_error_on_every_rank_within_30_seconds_naming_the_key():
    """Batch size, samples, weight decay, baseline lr and DHO2's k differ between the two
    ranks: `train` raises on both before the first training collective, naming the key."""
    proc = run_horovod(CONSISTENCY, 2, args=tuple(RUN_CASES), timeout=240)
    for rank in (0, 1):
        blocks = "\n".join(rank_output(proc.stdout, rank)).split("CONSISTENCY_ERROR ")[1:]
        assert [b.split()[0] for b in blocks] == [f"case={c}" for c in RUN_CASES], proc.stdout
        for block, (case, line) in zip(blocks, RUN_CASES.items()):
            lines = block.splitlines()
            assert lines[1].startswith("Training run ranks disagree on "), block
            assert case in lines[1].split(" on ", 1)[1].split(" (")[0].split(", "), block
            assert f"  {line}" in lines, block
            assert float(block.split("seconds=", 1)[1].split()[0]) < 30


def test_train_job_with_rank_dependent_flags_exits_2_on_every_rank():
    """Only rank 1 asks for the pipelined mode, first through DHO2's own communicator, then
    through jobs/train.py: Horovod's process sets would differ, so both ranks stop with one
    message naming each rank's sets and mode, before Horovod registers any set (no Gloo
    error). Then the job's ranks disagree on the batch size: the same kind of message."""
    proc = run_horovod(CONSISTENCY, 2, args=(
        "api", "job", "--optimizer", "dho2", "--num-samples", "400", "--epochs", "1",
        "--batch-size", "50", "--verbose", "0", "r1:--mode", "r1:pipelined",
        "++", "--optimizer", "adam", "--learning-rate", "1e-3", "--num-samples", "400",
        "--epochs", "1", "--schedule", "constant", "--verbose", "0",
        "r0:--batch-size", "r0:50", "r1:--batch-size", "r1:25"), timeout=120)
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "mismatching numbers of process sets" not in proc.stdout + proc.stderr
    for rank in (0, 1):
        lines = job_lines(proc, rank)
        api = lines.index(f"rank {rank} API_ERROR")
        assert lines[api + 1:api + 4] == [
            "Horovod start-up ranks disagree on process_sets, mode (every rank must use the "
            "same value):", "  process_sets: rank 0: []; rank 1: [[0], [1]]",
            '  mode: rank 0: "replicated"; rank 1: "pipelined"'], lines
        assert [line for line in lines if "JOB_STATUS" in line] == [
            f"rank {rank} JOB_STATUS 2"] * 2, lines
        first_seconds = float(next(line for line in lines if "JOB_SECONDS" in line).split()[-1])
        assert first_seconds < 20, lines
        assert (f"train.py: error (rank {rank}): Horovod start-up ranks disagree on "
                "process_sets, mode (every rank must use the same value):") in lines, lines
        assert "  process_sets: rank 0: []; rank 1: [[0], [1]]" in lines, lines
        assert '  mode: rank 0: "auto"; rank 1: "pipelined"' in lines, lines
        assert any(line.startswith(f"train.py: error (rank {rank}): Training run ranks "
                                   "disagree on ") for line in lines), lines
        assert "  batch_size: rank 0: 50; rank 1: 25" in lines, lines


def test_nan_batch_on_one_rank_is_skipped_by_every_rank():
    """Also: after a wrong c, both ranks' guards trip at the same steps (same launch)."""
    proc = run_horovod(SCRIPT, 2, args=("poisoned",), timeout=240)
    for layout in ("mode=sharded base=momentum", "mode=replicated base=momentum",
                   "mode=sharded base=adam"):
        assert proc.stdout.count(f"POISONED_OK {layout} skipped=1") == 2
    for mode in ("sharded", "replicated"):
        trips = [line.split("trips=")[1] for line in proc.stdout.splitlines()
                 if f"GUARD_OK mode={mode} " in line]
        assert len(trips) == 2 and trips[0] == trips[1], proc.stdout


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


@pytest.mark.slow
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


# ------------------------------------------------------------------ checkpoints across ranks
JOB_FLAGS = ("--optimizer", "adam", "--learning-rate", "1e-3", "--num-samples", "500",
             "--epochs", "2", "--schedule", "cosine", "--verbose", "0")


@pytest.fixture(scope="module")
def two_rank_checkpoint(tmp_path_factory):
    """A checkpoint written by 2 ranks x batch 50 after epoch 1 of 2 (the target stops it)."""
    folder = tmp_path_factory.mktemp("two_ranks") / "ckpt"
    proc = run_horovod(CONSISTENCY, 2, args=("job", *JOB_FLAGS, "--batch-size", "50",
                                             "--checkpoint-dir", str(folder),
                                             "--target-loss", "100"), timeout=120)
    assert "rank 0 JOB_STATUS 0" in proc.stdout and "rank 1 JOB_STATUS 0" in proc.stdout
    return folder


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


def test_a_corrupted_file_of_one_rank_stops_every_rank_naming_its_path(two_rank_checkpoint,
                                                                       tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(two_rank_checkpoint, folder)
    name = json.loads((folder / "checkpoint.json").read_text())["name"]
    victim = folder / name / "rank_00001.npz"
    victim.write_bytes(victim.read_bytes()[:100])
    proc = run_horovod(CONSISTENCY, 2, args=("job", *JOB_FLAGS, "--batch-size", "50",
                                             "--checkpoint-dir", str(folder), "--resume"),
                       timeout=120)
    for rank in (0, 1):
        lines = rank_output(proc.stdout, rank) + rank_output(proc.stderr, rank)
        assert f"rank {rank} JOB_STATUS 2" in lines, lines
        assert any(line.startswith(f"train.py: error (rank {rank}): rank 1: Checkpoint file "
                                   f"{victim} is unreadable or corrupted") for line in lines), lines


# ------------------------------------------------------ ranks that must agree before resuming
def test_resume_on_storage_one_rank_does_not_see_stops_every_rank_within_seconds(
        two_rank_checkpoint, tmp_path):
    """Node-local checkpoint folders (one per rank): rank 0 sees the checkpoint, rank 1 an
    empty folder. Both stop before loading data, naming what each rank saw (no hang)."""
    shutil.copytree(two_rank_checkpoint, tmp_path / "rank0" / "ckpt")
    (tmp_path / "rank1" / "ckpt").mkdir(parents=True)
    name = json.loads((tmp_path / "rank0" / "ckpt" / "checkpoint.json").read_text())["name"]
    start = time.monotonic()
    proc = run_horovod(CONSISTENCY, 2, args=("job", *JOB_FLAGS, "--batch-size", "50",
                                             "--checkpoint-dir", str(tmp_path / "rank{rank}" /
                                                                     "ckpt"), "--resume"),
                       timeout=120)
    assert time.monotonic() - start < 60
    for rank in (0, 1):
        lines = job_lines(proc, rank)
        assert f"rank {rank} JOB_STATUS 2" in lines, lines
        assert (f"train.py: error (rank {rank}): Ranks disagree on the checkpoint to resume "
                f"from {tmp_path / f'rank{rank}' / 'ckpt'} (every rank must see the same one; "
                "put --checkpoint-dir on storage every rank shares):") in lines, lines
        (seen,) = [line for line in lines if line.startswith("  checkpoint: ")]
        assert re.fullmatch(rf'  checkpoint: rank 0: "{name} \(epoch 1, step 4, run '
                            r'[0-9a-f]{12}\)"; rank 1: "no checkpoint"', seen), seen


def test_a_wrong_shape_in_one_ranks_file_is_named_on_every_rank(two_rank_checkpoint, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(two_rank_checkpoint, folder)
    name = json.loads((folder / "checkpoint.json").read_text())["name"]
    victim = folder / name / "rank_00001.npz"
    with np.load(victim) as arrays:
        content = {key: arrays[key] for key in arrays.files}
    content["model/0"] = np.zeros((3, 5), np.float32)
    with open(victim, "wb") as handle:
        np.savez(handle, **content)
    proc = run_horovod(CONSISTENCY, 2, args=("job", *JOB_FLAGS, "--batch-size", "50",
                                             "--checkpoint-dir", str(folder), "--resume"),
                       timeout=120)
    for rank in (0, 1):
        lines = job_lines(proc, rank)
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


def test_ranks_given_different_data_of_the_same_shape_stop_with_one_message(tmp_path):
    """Different CIFAR files of the same shape (same sizes, other content): exit 2 on every
    rank, naming the data's content hash, before training."""
    _write_cifar(tmp_path / "cifar0", seed=0)
    _write_cifar(tmp_path / "cifar1", seed=1)
    proc = run_horovod(CONSISTENCY, 2, args=(
        "job", "--dataset", "cifar10", "--model", "resnet20", "--optimizer", "adam",
        "--batch-size", "2", "--epochs", "1", "--verbose", "0",
        "--data-dir", str(tmp_path / "cifar{rank}")), timeout=120)
    for rank in (0, 1):
        lines = job_lines(proc, rank)
        assert f"rank {rank} JOB_STATUS 2" in lines, lines
        assert f"train.py: error (rank {rank}): Training run ranks disagree on training_data " \
               "(every rank must use the same value):" in lines, lines
        assert any(re.fullmatch(r'  training_data: rank 0: "[0-9a-f]{16}"; rank 1: '
                                r'"[0-9a-f]{16}"', line) for line in lines), lines
