"""One fingerprint builder (``dho2_tf.consistency.build_fingerprint``) behind the experiment's,
the elastic trainer's and the optimizer's rank checks.

Checkpoints record the experiment's fingerprint (``info.run``) and a resume compares it key by
key, so the experiment's keys and values must stay exactly those older versions wrote:
:func:`_fingerprint_as_recorded` is the experiment's fingerprint as it was written before the
builder existed, and every case below must give the same mapping.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
import tensorflow as tf

from dho2_tf.consistency import build_fingerprint, flatten_config
from dho2_tf.distributed.comm import LocalComm
from dho2_tf.training import experiment
from dho2_tf.training.dho2_arguments import DHO2Arguments
from dho2_tf.training.experiment import (RANK_LOCAL_FIELDS, TrainConfig, pipeline_groups,
                                         run_fingerprint)


def _fingerprint_as_recorded(config, comm, model, samples_per_rank, steps_per_epoch,
                             training_examples, training_ranks, data_hash=None):
    """The experiment's fingerprint as checkpoints already on disk record it."""
    values = {k: v for k, v in dataclasses.asdict(config).items() if k not in RANK_LOCAL_FIELDS}
    fingerprint = flatten_config(values)
    fingerprint.update({"ranks": comm.size, "training_examples": int(training_examples),
                        "global_batch": int(training_ranks * config.batch_size),
                        "num_trainable_variables": len(model.trainable_variables)})
    if data_hash is not None:
        fingerprint["training_data"] = data_hash
    if pipeline_groups(config, comm.size) is None:
        fingerprint.update({"samples_per_rank": int(samples_per_rank),
                            "steps_per_epoch": int(steps_per_epoch)})
    fingerprint.update({f"variable[{i}]": [list(v.shape), v.dtype.name]
                        for i, v in enumerate(model.trainable_variables)})
    return fingerprint


class _World(LocalComm):
    """A communicator that reports ``size`` ranks (the fingerprint reads only the size)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size


def _model(width: int) -> tf.keras.Model:
    tf.keras.utils.set_random_seed(0)
    return tf.keras.Sequential([tf.keras.Input((5,)),
                                tf.keras.layers.Dense(width, activation="relu"),
                                tf.keras.layers.BatchNormalization(),
                                tf.keras.layers.Dense(3)])


CASES = [
    # every rank trains: samples_per_rank and steps_per_epoch are recorded
    (TrainConfig(model="mlp", dataset="digits", optimizer="dho2", dho2=DHO2Arguments(k=4)),
     1, 1, True),
    (TrainConfig(model="mlp", dataset="digits", optimizer="adam", learning_rate=1e-3,
                 epochs=3, target_accuracy=0.9, verbose=0, data_dir="/somewhere"), 3, 3, False),
    (TrainConfig(model="mlp", dataset="digits", optimizer="sgd", prioritized=True,
                 prioritized_k=0.25), 2, 2, True),
    # pipelined: one curvature rank, the per-rank share is not recorded
    (TrainConfig(model="mlp", dataset="digits", optimizer="dho2",
                 dho2=DHO2Arguments(mode="pipelined", curvature_ranks=1)), 3, 2, True),
]


@pytest.mark.parametrize("config, ranks, training_ranks, hashed", CASES)
def test_the_experiment_fingerprint_keeps_the_recorded_keys_and_values(config, ranks,
                                                                      training_ranks, hashed):
    model, comm = _model(7), _World(ranks)
    rows = np.arange(60, dtype=np.float32).reshape(12, 5)
    data_hash = hashlib.sha256(rows.tobytes()).hexdigest()[:16] if hashed else None
    args = (config, comm, model, np.int64(40), 5, 120, training_ranks, data_hash)
    built, recorded = run_fingerprint(*args), _fingerprint_as_recorded(*args)
    assert built == recorded
    assert ("steps_per_epoch" in built) == (pipeline_groups(config, ranks) is None)
    assert built["global_batch"] == training_ranks * config.batch_size
    assert built["variable[0]"] == [[5, 7], "float32"]
    assert built["num_trainable_variables"] == 6  # two Dense (kernel, bias), BN (gamma, beta)
    assert not set(RANK_LOCAL_FIELDS) & set(built)


def test_build_fingerprint_keys_and_clashes():
    model = _model(4)
    built = build_fingerprint({"optimizer": {"k": np.int32(2), "betas": (0.9, 0.99)}, "seed": 1},
                              {"ranks": 2, "shape": (3, 4)}, model.trainable_variables,
                              data_hash="abc")
    assert built == {"optimizer.k": 2, "optimizer.betas": [0.9, 0.99], "seed": 1, "ranks": 2,
                     "shape": [3, 4], "num_trainable_variables": 6,
                     "variable[0]": [[5, 4], "float32"], "variable[1]": [[4], "float32"],
                     "variable[2]": [[4], "float32"], "variable[3]": [[4], "float32"],
                     "variable[4]": [[4, 3], "float32"], "variable[5]": [[3], "float32"],
                     "training_data": "abc"}
    assert build_fingerprint({"a": 1}) == {"a": 1}
    with pytest.raises(ValueError, match=r"\['seed'\] in both"):
        build_fingerprint({"seed": 1}, {"seed": 2})
    with pytest.raises(ValueError, match=r"\['training_data'\] in both"):
        build_fingerprint({"training_data": "x"}, data_hash="y")


def test_the_resume_check_reads_the_built_fingerprint(tmp_path):
    """A checkpoint's recorded run (old form) against a built one: a changed width is refused."""
    config = TrainConfig(model="mlp", dataset="digits", optimizer="adam", learning_rate=1e-3,
                         checkpoint_dir=str(tmp_path))
    args = (LocalComm(), 40, 5, 40, 1)
    recorded = _fingerprint_as_recorded(config, args[0], _model(7), *args[1:])
    info = experiment.CheckpointInfo(name="ckpt-00001-x", epoch=1, step=5, ranks=1, mode=None,
                                     run=recorded)
    experiment.check_resume_compatible(info, run_fingerprint(config, args[0], _model(7),
                                                             *args[1:]), config, args[0])
    with pytest.raises(experiment.CheckpointError, match=r"variable\[0\]: checkpoint \[\[5, 7\]"):
        experiment.check_resume_compatible(info, run_fingerprint(config, args[0], _model(9),
                                                                 *args[1:]), config, args[0])
