"""Checkpoints that never lose a good state: retention of the last N and of the last good one,
ownership of folders, the directory lock, clean-up of failed writes, and configuration errors
that are one-line errors before any work."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from dho2_tf import DHO2
from dho2_tf.distributed.comm import LocalComm
from dho2_tf.training import checkpoint_lock, checkpointing, experiment
from dho2_tf.training.checkpointing import CheckpointError
from dho2_tf.training.experiment import TrainConfig, train
from tests.helpers.jobs import job

#: Its ``train`` runs load the same MNIST-1D datasets: each is generated once per module.
pytestmark = pytest.mark.usefixtures("mnist1d_once")

TINY = {"num_samples": 500, "epochs": 1, "batch_size": 50, "verbose": 0,
        "optimizer": "adam", "learning_rate": 1e-3, "schedule": "constant"}
DHO2_TINY = {"num_samples": 500, "batch_size": 50, "verbose": 0, "optimizer": "dho2",
             "base": "momentum",
             "k": 2, "curvature_batch": 50, "refresh_every": 4, "warmup": 2,
             "learning_rate": 0.05, "schedule": "constant"}


def folders(directory):
    return sorted(e for e in os.listdir(directory) if e.startswith("ckpt-"))


def manifest(directory):
    return json.loads((directory / checkpointing.MANIFEST).read_text())


# ------------------------------------------------------------------ retention (finding 1)
def test_the_newest_keep_checkpoints_are_kept_and_older_owned_ones_deleted(tmp_path):
    train(TrainConfig.from_dict({**TINY, "epochs": 4, "checkpoint_dir": str(tmp_path)}), LocalComm())
    listed = manifest(tmp_path)["checkpoints"]
    assert [c["epoch"] for c in listed] == [3, 4] and all(c["good"] for c in listed)
    assert folders(tmp_path) == sorted(c["name"] for c in listed)
    train(TrainConfig.from_dict({**TINY, "epochs": 6, "checkpoint_dir": str(tmp_path), "resume": True,
                         "keep_checkpoints": 3}), LocalComm())
    assert [c["epoch"] for c in manifest(tmp_path)["checkpoints"]] == [4, 5, 6]
    assert len(folders(tmp_path)) == 3


def test_a_diverged_resume_never_displaces_the_last_good_checkpoint(tmp_path):
    """Epoch 2 is good; a resume at lr 1e4 skips (nearly) every step of epochs 3-5: their
    checkpoints are written but marked bad, epoch 2's stays, and --resume continues it."""
    base = {**DHO2_TINY, "checkpoint_dir": str(tmp_path)}
    train(TrainConfig.from_dict({**base, "epochs": 2}), LocalComm())
    good = manifest(tmp_path)["name"]
    diverged = train(TrainConfig.from_dict({**base, "epochs": 5, "resume": True, "learning_rate": 1e4,
                                    "allow_config_change": "learning_rate"}), LocalComm())
    assert diverged.initial_epoch == 2
    listed = manifest(tmp_path)["checkpoints"]
    assert listed[0] == {**listed[0], "name": good, "epoch": 2, "good": True}
    assert [(c["epoch"], c["good"]) for c in listed[1:]] == [(4, False), (5, False)]
    assert folders(tmp_path) == sorted(c["name"] for c in listed)
    # A sane resume continues epoch 2's checkpoint, not the frozen weights of epoch 5.
    again = train(TrainConfig.from_dict({**base, "epochs": 3, "resume": True}), LocalComm())
    assert again.initial_epoch == 2 and np.isfinite(again.train_loss)
    assert manifest(tmp_path)["epoch"] == 3 and manifest(tmp_path)["good"] is True
    # A bad one is resumed only when named.
    with pytest.raises(CheckpointError, match="`resume_from` names 'ckpt-nope'"):
        train(TrainConfig.from_dict({**base, "epochs": 9, "resume": True, "resume_from": "ckpt-nope"}),
              LocalComm())


def test_retention_keeps_the_newest_good_one_besides_the_newest_n():
    def info(epoch, good):
        return checkpointing.CheckpointInfo(f"ckpt-{epoch}", epoch, epoch, 1, None, good=good)

    listed = [info(1, True), info(2, True), info(3, False), info(4, False)]
    assert [c.epoch for c in checkpointing.retained(listed, 2)] == [2, 3, 4]
    assert [c.epoch for c in checkpointing.retained(listed, 1)] == [2, 4]
    assert [c.epoch for c in checkpointing.retained(listed[:2], 1)] == [2]
    assert checkpointing.epoch_is_good(1.0, 4, 8, 0.5)
    assert not checkpointing.epoch_is_good(1.0, 5, 8, 0.5)
    assert not checkpointing.epoch_is_good(float("nan"), 0, 8, 0.5)


# ------------------------------------------------------------------ ownership (finding 2)
def test_a_checkpoint_without_its_manifest_is_refused_never_deleted_and_recoverable(tmp_path):
    base = {**TINY, "checkpoint_dir": str(tmp_path)}
    train(TrainConfig.from_dict(base), LocalComm())
    (name,) = folders(tmp_path)
    (tmp_path / checkpointing.MANIFEST).unlink()
    for extra in ({}, {"resume": True, "epochs": 2}, {"overwrite": True}):
        with pytest.raises(CheckpointError) as err:
            train(TrainConfig.from_dict({**base, **extra}), LocalComm())
        assert str(err.value) == (
            f"The checkpoint directory {tmp_path} holds checkpoint folder(s) its manifest "
            f"(checkpoint.json) does not list: {name}. Only listed folders are ever deleted, "
            f"so the run refuses to share the directory with them. Move them out of "
            f"{tmp_path}, or adopt a complete one with: python jobs/train.py --checkpoint-dir "
            f"{tmp_path} --recover-from FOLDER (rebuilds checkpoint.json).")
        assert folders(tmp_path) == [name]
    # --recover-from rebuilds the manifest from the complete folder; then --resume works.
    assert job("train").main(["--checkpoint-dir", str(tmp_path), "--recover-from",
                              str(tmp_path / name)]) == 0
    assert manifest(tmp_path)["name"] == name and manifest(tmp_path)["epoch"] == 1
    assert train(TrainConfig.from_dict({**base, "resume": True, "epochs": 2}),
                 LocalComm()).initial_epoch == 1


def test_a_users_own_ckpt_folder_is_never_deleted(tmp_path):
    mine = tmp_path / "ckpt-best-model"
    mine.mkdir()
    (mine / "weights.h5").write_text("precious")
    with pytest.raises(CheckpointError, match="does not list: ckpt-best-model"):
        train(TrainConfig.from_dict({**TINY, "checkpoint_dir": str(tmp_path)}), LocalComm())
    assert (mine / "weights.h5").read_text() == "precious"
    with pytest.raises(CheckpointError, match=r"Cannot recover .*ckpt-best-model: it is not a "
                                              r"complete checkpoint folder"):
        checkpointing.recover_checkpoint(tmp_path, "ckpt-best-model")


# ------------------------------------------------------------------ lock (finding 4)
def test_the_lock_refuses_a_live_holder_and_takes_over_a_dead_ones(tmp_path):
    lock = tmp_path / checkpoint_lock.LOCK
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": live.pid}))
        with pytest.raises(CheckpointError) as err:
            checkpoint_lock.acquire_lock(str(tmp_path))
        assert str(err.value) == (
            f"The checkpoint directory {tmp_path} is in use by another run (lock {lock}: host "
            f"{socket.gethostname()!r}, pid {live.pid}). Two runs on one directory would "
            "delete each other's checkpoints: wait for that run to finish or choose another "
            f"--checkpoint-dir. If that run is gone (its host crashed), delete {lock}.")
    finally:
        live.kill()
        live.wait()
    # The holder died (pid gone on this host): its lock is stale and taken over.
    checkpoint_lock.acquire_lock(str(tmp_path))
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    checkpoint_lock.release_lock(str(tmp_path))
    assert not lock.exists()
    # Another host's process cannot be checked from here: refused.
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    with pytest.raises(CheckpointError, match="host 'elsewhere', pid 1"):
        train(TrainConfig.from_dict({**TINY, "checkpoint_dir": str(tmp_path)}), LocalComm())
    checkpoint_lock.release_lock(str(tmp_path))      # not ours: left alone
    assert lock.exists()


def test_train_holds_the_lock_while_it_runs_and_releases_it(tmp_path):
    seen = []

    class Probe(tf.keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append(json.loads((tmp_path / checkpoint_lock.LOCK).read_text())["pid"])

    train(TrainConfig.from_dict({**TINY, "checkpoint_dir": str(tmp_path)}), LocalComm(),
          extra_callbacks=[Probe()])
    assert seen == [os.getpid()] and not (tmp_path / checkpoint_lock.LOCK).exists()


# ------------------------------------------------------------------ failed writes (finding 5)
def test_a_full_disk_during_the_manifest_write_leaves_no_orphan(tmp_path, monkeypatch):
    base = {**TINY, "checkpoint_dir": str(tmp_path)}
    train(TrainConfig.from_dict(base), LocalComm())
    before = folders(tmp_path)
    original = checkpointing._write_json_atomically

    def full_disk(path, payload):
        if path.endswith(checkpointing.MANIFEST):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        original(path, payload)

    monkeypatch.setattr(checkpointing, "_write_json_atomically", full_disk)
    with pytest.raises(CheckpointError, match=r"Could not write checkpoint .*ckpt-00002-.* "
                                              r"\(No space left on device\); its partial folder "
                                              r"was removed and the previous checkpoints are "
                                              r"intact"):
        train(TrainConfig.from_dict({**base, "resume": True, "epochs": 2}), LocalComm())
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == sorted([checkpointing.MANIFEST, *before])
    assert train(TrainConfig.from_dict({**base, "resume": True, "epochs": 2}),
                 LocalComm()).initial_epoch == 1


def test_the_next_start_removes_the_folders_of_a_save_that_died(tmp_path):
    base = {**TINY, "checkpoint_dir": str(tmp_path)}
    train(TrainConfig.from_dict(base), LocalComm())
    (kept,) = folders(tmp_path)
    # What a writer killed after renaming its folder, before the manifest, leaves behind.
    orphan = tmp_path / "ckpt-00002-00000016-deadbeef"
    orphan.mkdir()
    (orphan / "shared.npz").write_bytes(b"x" * 1000)
    (tmp_path / checkpointing.PENDING).write_text(json.dumps(
        {"folders": [".tmp-" + orphan.name, orphan.name]}))
    info = experiment.validated_checkpoint_dir(
        TrainConfig.from_dict({**base, "resume": True, "epochs": 2}), LocalComm())
    assert info.name == kept
    assert sorted(os.listdir(tmp_path)) == sorted([checkpointing.MANIFEST, kept,
                                                   checkpoint_lock.LOCK])
    checkpoint_lock.release_lock(str(tmp_path))


# ------------------------------------------------------------------ validation (findings 6-8)
def test_k_plus_ell_and_lanczos_order_beyond_the_parameter_count_fail_at_build():
    model = tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Dense(2)])  # n = 8
    with pytest.raises(ValueError, match=r"`k \+ ell` must not exceed the 8 trainable "
                                         r"parameters of the model\. Received: k=6, ell=3"):
        DHO2(k=6, ell=3).build(model.trainable_variables)
    with pytest.raises(ValueError, match=r"`lanczos_order` must not exceed the 8 trainable "
                                         r"parameters.*lanczos_order=9"):
        DHO2(k=2, lanczos_order=9).build(model.trainable_variables)
    DHO2(k=2, lanczos_order=8).build(model.trainable_variables)


def test_allow_config_change_epochs_is_accepted_under_a_constant_schedule(tmp_path):
    base = {**TINY, "checkpoint_dir": str(tmp_path)}
    train(TrainConfig.from_dict(base), LocalComm())
    result = train(TrainConfig.from_dict({**base, "resume": True, "epochs": 2,
                                  "allow_config_change": "epochs"}), LocalComm())
    assert result.initial_epoch == 1 and manifest(tmp_path)["epoch"] == 2
