"""jobs/train.py run as a process refuses what it cannot do before any work: each configuration
error exits 2 with one line and no traceback, and a second run on a checkpoint directory a live
run holds is refused, naming the lock, the holder's host and pid.

Uses only what a user drives (the command line, the checkpoint directory), so each test checks
the behaviour itself rather than a helper module.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dho2_tf.distributed.comm import LocalComm
from dho2_tf.training import checkpointing
from dho2_tf.training.experiment import TrainConfig, train
from tests.helpers.launch import REPO

#: Its ``train`` runs load the same MNIST-1D datasets: each is generated once per module.
pytestmark = pytest.mark.usefixtures("mnist1d_once")

TINY = {"num_samples": 500, "epochs": 1, "batch_size": 50, "verbose": 0,
        "optimizer": "adam", "learning_rate": 1e-3, "schedule": "constant"}
# TINY as flags: a resume that repeats the checkpoint's own settings, so that no refusal of a
# changed configuration answers before the error under test.
TINY_FLAGS = ("--optimizer", "adam", "--num-samples", "500", "--batch-size", "50",
              "--learning-rate", "0.001", "--schedule", "constant")


def folders(directory):
    return sorted(e for e in os.listdir(directory) if e.startswith("ckpt-"))


def run_job(*argv):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO)}
    env.pop("HOROVOD_RANK", None)
    return subprocess.run([sys.executable, str(REPO / "jobs/train.py"), "--verbose", "0",
                           *argv], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=env)


def error_lines(proc):
    return [line for line in proc.stderr.splitlines() if "error" in line]


def one_epoch_checkpoint(folder: Path) -> tuple[Path, str]:
    """A one-epoch TINY checkpoint in ``folder``: (its manifest path, its folder name)."""
    train(TrainConfig.from_dict({**TINY, "checkpoint_dir": str(folder)}), LocalComm())
    manifest_path = folder / checkpointing.MANIFEST
    return manifest_path, json.loads(manifest_path.read_text())["name"]


def k_too_large(tmp_path):
    return (("--k", "20000", "--num-samples", "500", "--epochs", "1"),
            "train.py: error (rank 0): `k + ell` must not exceed the 15210 trainable "
            "parameters")


def batch_larger_than_the_data(tmp_path):
    return (("--optimizer", "adam", "--num-samples", "500", "--batch-size", "1000"),
            "train.py: error (rank 0): `batch_size` must not exceed a rank's share of the 400 "
            "training examples over 1 ranks (400). Received: batch_size=1000")


def missing_cifar_folder(tmp_path):
    return (("--dataset", "cifar10", "--model", "resnet20", "--data-dir",
             str(tmp_path / "no")),
            "train.py: error (rank 0): `data_dir` does not hold the cifar10 files: CIFAR "
            "folder ")


def resume_with_epochs_already_done(tmp_path):
    folder = tmp_path / "ckpt"
    _, name = one_epoch_checkpoint(folder)
    return ((*TINY_FLAGS, "--checkpoint-dir", str(folder), "--resume", "--epochs", "1"),
            f"train.py: error (rank 0): The checkpoint {name} in {folder} has already "
            "completed 1 epochs; `epochs` must exceed that to resume. Received: epochs=1")


def manifest_epoch_not_an_integer(tmp_path):
    folder = tmp_path / "ckpt"
    manifest_path, _ = one_epoch_checkpoint(folder)
    manifest_path.write_text(manifest_path.read_text().replace('"epoch": 1', '"epoch": "two"',
                                                               1))
    return ((*TINY_FLAGS, "--checkpoint-dir", str(folder), "--resume", "--epochs", "3"),
            f"train.py: error (rank 0): The checkpoint manifest {manifest_path} is unreadable "
            "or corrupted: 'epoch' must be an integer >= 0, not 'two'.")


@pytest.mark.parametrize("case", [k_too_large, batch_larger_than_the_data, missing_cifar_folder,
                                  resume_with_epochs_already_done,
                                  manifest_epoch_not_an_integer], ids=lambda case: case.__name__)
def test_configuration_errors_exit_2_with_one_line(case, tmp_path):
    """Too large k, a batch larger than a rank's data, a missing CIFAR folder, a resume with
    epochs already done and a corrupted manifest: status 2 and one line, no traceback."""
    argv, expected = case(tmp_path)
    proc = run_job(*argv)
    assert proc.returncode == 2, (argv, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = error_lines(proc)
    assert expected in line, (expected, proc.stderr[-2000:])


def test_a_second_run_on_a_directory_in_use_is_refused_and_a_killed_runs_lock_is_stale(
        tmp_path):
    """Two jobs/train.py processes on one directory: the second exits 2 naming the first's
    lock, host and pid; once the first is killed (SIGKILL: no clean-up), its lock is stale and
    a resume proceeds."""
    flags = ("--optimizer", "adam", "--num-samples", "500", "--schedule", "constant",
             "--epochs", "2000", "--checkpoint-dir", str(tmp_path))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO)}
    env.pop("HOROVOD_RANK", None)
    first = subprocess.Popen([sys.executable, str(REPO / "jobs/train.py"), "--verbose", "0",
                              *flags], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not folders(tmp_path) and time.monotonic() < deadline:
            assert first.poll() is None, first.stderr.read()[-3000:]
            time.sleep(0.5)
        # Were it not refused, one epoch and a stop (--target-loss 100 is met at its end).
        second = run_job(*flags, "--resume", "--target-loss", "100")
        assert first.poll() is None   # still training: the refusal was because of its lock
        assert second.returncode == 2, second.stderr[-3000:]
        (line,) = error_lines(second)
        found = re.search(r"\(lock (\S+): host ", line)
        assert found, line
        lock = Path(found.group(1))
        assert lock.parent == tmp_path
        assert line == (
            f"train.py: error (rank 0): The checkpoint directory {tmp_path} is in use by "
            f"another run (lock {lock}: host {socket.gethostname()!r}, pid {first.pid}). Two "
            "runs on one directory would delete each other's checkpoints: wait for that run "
            "to finish or choose another --checkpoint-dir. If that run is gone (its host "
            f"crashed), delete {lock}.")
    finally:
        first.kill()
        first.wait()
    assert json.loads(lock.read_text())["pid"] == first.pid   # left behind by the killed run
    third = run_job(*flags, "--resume", "--target-loss", "100")
    assert third.returncode == 0, third.stderr[-3000:]
    assert "Removing the stale lock" in third.stderr and not lock.exists()
