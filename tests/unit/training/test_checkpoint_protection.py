"""Checkpoints that protect data: no silent overwrite, resume refuses incompatible changes,
the directory is validated before training, corrupted files are named."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from dho2_tf import models
from dho2_tf.training import checkpointing, experiment
from dho2_tf.training.checkpointing import CheckpointError
from dho2_tf.distributed.comm import LocalComm
from dho2_tf.training.experiment import TrainConfig, train

#: Its ``train`` runs load the same MNIST-1D datasets: each is generated once per module.
pytestmark = pytest.mark.usefixtures("mnist1d_once")

TINY = {"num_samples": 500, "epochs": 1, "batch_size": 50, "verbose": 0,
        "optimizer": "adam", "learning_rate": 1e-3}


class _Keep(tf.keras.callbacks.Callback):
    """Remembers the model's final weights."""

    def on_train_end(self, logs=None):
        self.weights = [v.numpy().copy() for v in self.model.variables]


def _restored_weights(config):
    """A fresh model + optimizer of ``config`` with the checkpoint of its directory loaded."""
    data = experiment.load_data(config)
    model = models.get(config.model, data.input_shape, data.num_classes,
                       weight_decay=config.weight_decay)
    model.compile(optimizer=experiment.make_optimizer(config, 8, LocalComm()),
                  loss=models.objective(config.model).make_loss())
    checkpointing.restore_checkpoint(config.checkpoint_dir, model, model.optimizer, LocalComm())
    return [v.numpy() for v in model.variables]


def test_existing_checkpoint_is_refused_without_resume_and_still_loads(tmp_path):
    folder = str(tmp_path / "ckpt")
    keep = _Keep()
    train(TrainConfig(checkpoint_dir=folder, **TINY), LocalComm(), extra_callbacks=[keep])
    before = checkpointing.read_manifest(folder)
    files = sorted(os.listdir(folder))
    with pytest.raises(CheckpointError, match=r"already holds a checkpoint \(epoch 1, step 8, "
                                              r"1 rank\(s\)\); it is not replaced silently\. "
                                              r"Pass --resume .* --overwrite"):
        train(TrainConfig(checkpoint_dir=folder, **{**TINY, "learning_rate": 5e-3}),
              LocalComm())
    assert checkpointing.read_manifest(folder) == before and sorted(os.listdir(folder)) == files
    for got, want in zip(_restored_weights(TrainConfig(checkpoint_dir=folder, **TINY)),
                         keep.weights):
        np.testing.assert_array_equal(got, want)
    # --overwrite replaces it deliberately: a new checkpoint, the old folder removed.
    again = _Keep()
    train(TrainConfig(checkpoint_dir=folder, overwrite=True, **{**TINY, "seed": 1}),
          LocalComm(), extra_callbacks=[again])
    after = checkpointing.read_manifest(folder)
    assert after.name != before.name and sorted(os.listdir(folder)) == sorted(
        [checkpointing.MANIFEST, after.name])
    assert not np.allclose(again.weights[0], keep.weights[0])
    for got, want in zip(_restored_weights(TrainConfig(checkpoint_dir=folder, **TINY)),
                         again.weights):
        np.testing.assert_array_equal(got, want)


def test_manifest_records_the_run_and_resume_refuses_incompatible_changes(tmp_path):
    folder = str(tmp_path / "ckpt")
    base = {**TINY, "checkpoint_dir": folder, "schedule": "cosine"}
    train(TrainConfig.from_dict(base), LocalComm())
    run = json.loads((tmp_path / "ckpt" / checkpointing.MANIFEST).read_text())["run"]
    assert (run["learning_rate"], run["epochs"], run["batch_size"], run["ranks"],
            run["steps_per_epoch"], run["global_batch"], run["weight_decay"]) == (
        1e-3, 1, 50, 1, 8, 50, 3e-4)
    assert run["variable[0]"] == [[40, 100], "float32"] and run["model"] == "mlp"
    changed = TrainConfig.from_dict({**base, "resume": True, "epochs": 3, "learning_rate": 2e-3})
    with pytest.raises(CheckpointError) as err:
        train(changed, LocalComm())
    message = str(err.value)
    assert "  epochs: checkpoint 1, this run 3" in message
    assert "  learning_rate: checkpoint 0.001, this run 0.002" in message
    assert message.endswith("--allow-config-change epochs,learning_rate.")
    assert checkpointing.read_manifest(folder).epoch == 1       # nothing was trained
    with pytest.raises(CheckpointError, match=r"names unknown key\(s\) \['lr'\]"):
        train(TrainConfig.from_dict({**changed.__dict__, "allow_config_change": "lr"}), LocalComm())
    # Allowed deliberately: the run continues from epoch 1.
    result = train(TrainConfig.from_dict({**changed.__dict__,
                                  "allow_config_change": "epochs,learning_rate"}), LocalComm())
    assert result.initial_epoch == 1 and len(result.history) == 2
    assert checkpointing.read_manifest(folder).run["learning_rate"] == 2e-3


def test_more_epochs_under_a_constant_schedule_resume_without_a_flag(tmp_path):
    base = {**TINY, "checkpoint_dir": str(tmp_path), "schedule": "constant"}
    train(TrainConfig.from_dict(base), LocalComm())
    result = train(TrainConfig.from_dict({**base, "resume": True, "epochs": 2}), LocalComm())
    assert result.initial_epoch == 1 and checkpointing.read_manifest(tmp_path).step == 16


def test_a_checkpoint_dir_that_is_a_file_is_rejected_before_the_data_is_loaded(tmp_path,
                                                                                monkeypatch):
    target = tmp_path / "not_a_dir"
    target.write_text("x")

    def no_data(config):
        raise AssertionError("the data was loaded before the directory was checked")

    monkeypatch.setattr(experiment, "load_data", no_data)
    with pytest.raises(CheckpointError, match=f"The checkpoint directory {target} is a file, "
                                              "not a directory"):
        train(TrainConfig(checkpoint_dir=str(target), **TINY), LocalComm())
    with pytest.raises(CheckpointError, match="is not writable"):
        train(TrainConfig(checkpoint_dir=str(target / "sub"), **TINY), LocalComm())
    assert target.read_text() == "x"


def test_resume_and_overwrite_together_are_refused():
    with pytest.raises(ValueError, match="`overwrite` replaces the checkpoint"):
        TrainConfig(checkpoint_dir="d", resume=True, overwrite=True, **TINY).validate()
    with pytest.raises(ValueError, match="`allow_config_change` applies to a resume"):
        TrainConfig(checkpoint_dir="d", allow_config_change="epochs", **TINY).validate()


@pytest.mark.parametrize("victim,damage", [("rank_00000.npz", "truncate"),
                                           ("shared.npz", "garbage"),
                                           ("rank_00000.npz", "empty")])
def test_a_corrupted_checkpoint_file_is_named_with_what_to_do(tmp_path, victim, damage):
    base = {**TINY, "checkpoint_dir": str(tmp_path), "schedule": "constant"}
    train(TrainConfig.from_dict(base), LocalComm())
    path = tmp_path / checkpointing.read_manifest(tmp_path).name / victim
    content = path.read_bytes()
    path.write_bytes({"truncate": content[:len(content) // 2],
                      "garbage": b"\x00not a zip" * 50, "empty": b""}[damage])
    with pytest.raises(CheckpointError) as err:
        train(TrainConfig.from_dict({**base, "resume": True, "epochs": 2}), LocalComm())
    message = str(err.value)
    assert message.startswith(f"Checkpoint file {path} is unreadable or corrupted (")
    assert "--overwrite" in message and "backup" in message


def test_a_corrupted_manifest_is_named_with_what_to_do(tmp_path):
    base = {**TINY, "checkpoint_dir": str(tmp_path)}
    train(TrainConfig.from_dict(base), LocalComm())
    (tmp_path / checkpointing.MANIFEST).write_text('{"format": 2, "name": ')
    with pytest.raises(CheckpointError, match=f"manifest {tmp_path / 'checkpoint.json'} is "
                                              "unreadable or corrupted: .*--overwrite"):
        train(TrainConfig.from_dict({**base, "resume": True, "epochs": 2}), LocalComm())
    # --overwrite does not delete the folder the broken manifest listed (ownership unknown):
    # refused, naming it; once it is moved away, --overwrite starts afresh.
    (name,) = [e for e in os.listdir(tmp_path) if e.startswith("ckpt-")]
    with pytest.raises(CheckpointError, match=f"does not list: {name}. Only listed folders"):
        train(TrainConfig.from_dict({**base, "overwrite": True}), LocalComm())
    os.rename(tmp_path / name, tmp_path / "moved-away")
    assert train(TrainConfig.from_dict({**base, "overwrite": True}), LocalComm()).initial_epoch == 0
    assert checkpointing.read_manifest(tmp_path).epoch == 1


class _OtherRank(LocalComm):
    """Rank 0 of two ranks; rank 1 answers ``answer`` to the directory check."""

    def __init__(self, answer):
        super().__init__()
        self.size, self.answer = 2, answer

    def allgather_object(self, obj, *, name):
        assert name == "dho2/checkpoint/validate"
        return [obj, {"problem": self.answer, "checkpoint": None}]


def test_a_directory_problem_on_one_rank_stops_every_rank(tmp_path):
    config = TrainConfig(checkpoint_dir=str(tmp_path / "ckpt"), **TINY)
    # Rank 0's directory is fine; rank 1 cannot write it: rank 0 raises too, naming rank 1.
    with pytest.raises(CheckpointError, match=r"^rank 1: The checkpoint directory .* is not "
                                              r"writable \(Permission denied\)"):
        experiment.validated_checkpoint_dir(
            config, _OtherRank(f"The checkpoint directory {config.checkpoint_dir} is not "
                               "writable (Permission denied). Fix its permissions."))
    assert experiment.validated_checkpoint_dir(config, _OtherRank("")) is None
