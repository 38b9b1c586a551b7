"""TensorBoardMonitor: the event files hold the right tags and the right values."""

from __future__ import annotations

import glob
import os
from collections import defaultdict

import numpy as np
import pytest
import tensorflow as tf

from dho2_tf.callbacks import CurvatureRefresh
from dho2_tf.callbacks import TestAccuracyClock as AccuracyClock
from dho2_tf.distributed.comm import LocalComm
from dho2_tf.training.monitoring import TensorBoardMonitor, current_learning_rate, priority_statistics
from dho2_tf.optimizer import DHO2

SCCE = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def read_events(log_dir: str) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list]]:
    """Scalars {tag: [(step, value)]} and histograms {tag: [step]} of every event file."""
    scalars: dict[str, list[tuple[int, float]]] = defaultdict(list)
    histograms: dict[str, list[int]] = defaultdict(list)
    for path in sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                plugin = value.metadata.plugin_data.plugin_name
                array = tf.make_ndarray(value.tensor)
                if plugin == "histograms":
                    histograms[value.tag].append(event.step)
                else:
                    scalars[value.tag].append((event.step, float(array)))
    return scalars, histograms


def data(n: int = 240, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    return x, (x[:, 0] + x[:, 1] > 0).astype(np.int32)


def small_model() -> tf.keras.Model:
    tf.keras.utils.set_random_seed(0)
    return tf.keras.Sequential([tf.keras.Input((8,)), tf.keras.layers.Dense(6, activation="tanh"),
                                tf.keras.layers.Dense(2)])


def test_dho2_run_logs_loss_lr_step_time_and_eigenvalues_with_exact_values(tmp_path):
    x, y = data()
    model = small_model()
    schedule = tf.keras.optimizers.schedules.CosineDecay(0.05, 60)
    opt = DHO2(learning_rate=schedule, base="momentum", k=2, refresh_every=15, warmup=12,
               comm=LocalComm())
    model.compile(optimizer=opt, loss=SCCE, metrics=["accuracy"])
    refresh = CurvatureRefresh(batch=(x[:64], y[:64]))
    clock = AccuracyClock(x[:80], y[:80])
    monitor = TensorBoardMonitor(tmp_path, comm=LocalComm(), update_freq=1)
    history = model.fit(x, y, batch_size=20, epochs=2, verbose=0,
                        callbacks=[refresh, clock, monitor])
    scalars, histograms = read_events(str(tmp_path))

    for key in ("loss", "accuracy", "test_accuracy", "test_loss"):
        logged = [v for _, v in sorted(scalars[f"epoch/{key}"])]
        np.testing.assert_allclose(logged, history.history[key], rtol=1e-6)
    assert [s for s, _ in sorted(scalars["epoch/loss"])] == [0, 1]
    # The learning rate logged at step t is the schedule's value there.
    for step, value in scalars["batch/learning_rate"]:
        assert value == pytest.approx(float(schedule(step)), rel=1e-6)
    assert len(scalars["batch/step_seconds"]) == 24
    assert all(v > 0 for _, v in scalars["batch/step_seconds"])

    # One refresh ran (before update 12): its eigenvalues are the optimizer's final ones.
    assert len(refresh.refreshes) == 1
    eigenvalues = opt.state.eigenvalues.numpy()
    for j, value in enumerate(eigenvalues):
        assert scalars[f"refresh/eigenvalue_{j}"] == [(11, pytest.approx(float(value)))]
        assert scalars[f"curvature/eigenvalue_{j}"][-1][1] == pytest.approx(float(value))
    assert scalars["refresh/seconds"][0][1] == pytest.approx(refresh.refreshes[0]["seconds"])
    assert scalars["refresh/scale"][0][1] == pytest.approx(float(opt.state.scale.numpy()))
    assert histograms["refresh/ritz_values"] == [11]
    # No eigenvalue tag before the first refresh (step 12): the zeros there are no estimate.
    for j in range(len(eigenvalues)):
        assert min(step for step, _ in scalars[f"curvature/eigenvalue_{j}"]) >= 12
    assert min(step for step, _ in scalars["curvature/refreshes"]) == 1
    # Every key the optimizer reports (eigenvalues, scale, ADMM residuals, ...) is logged.
    for key, value in opt.curvature_metrics().items():
        assert scalars[f"curvature/{key}"][-1][1] == pytest.approx(value)


def test_baseline_run_logs_no_curvature_tags(tmp_path):
    x, y = data()
    model = small_model()
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3), loss=SCCE)
    monitor = TensorBoardMonitor(tmp_path, comm=LocalComm(), update_freq=4)
    history = model.fit(x, y, batch_size=40, epochs=1, verbose=0, callbacks=[monitor])
    scalars, histograms = read_events(str(tmp_path))
    assert scalars["epoch/loss"] == [(0, pytest.approx(history.history["loss"][0]))]
    assert scalars["epoch/learning_rate"] == [(0, pytest.approx(1e-3))]
    assert [s for s, _ in scalars["batch/loss"]] == [4]  # every 4th of 6 steps
    assert not [t for t in scalars if t.startswith(("curvature/", "refresh/", "priority/"))]
    assert not histograms


class _RankOne(LocalComm):
    def __init__(self) -> None:
        super().__init__()
        self.rank, self.size = 1, 2


def test_non_root_rank_writes_nothing(tmp_path):
    x, y = data(40)
    model = small_model()
    model.compile(optimizer=tf.keras.optimizers.SGD(0.1), loss=SCCE)
    log_dir = tmp_path / "tb"
    model.fit(x, y, batch_size=20, epochs=1, verbose=0,
              callbacks=[TensorBoardMonitor(log_dir, comm=_RankOne(), update_freq=1)])
    assert not log_dir.exists()


def test_priority_statistics_of_a_prioritized_model(tmp_path):
    from dho2_tf.prioritized import PrioritizedModel, PrioritizedSampler

    x, y = data(200)
    pmodel = PrioritizedModel(small_model(), PrioritizedSampler.paper(k=0.1, r=0.05),
                              comm=LocalComm())
    pmodel.compile(optimizer=tf.keras.optimizers.SGD(0.1), loss=SCCE)
    pmodel.fit(x, y, epochs=1, verbose=0,
               callbacks=[TensorBoardMonitor(tmp_path, comm=LocalComm(), update_freq=1)])
    scalars, _ = read_events(str(tmp_path))
    expected = priority_statistics(pmodel)
    assert set(expected) == {"mean", "std", "min", "max", "step", "evaluations"}
    for key, value in expected.items():
        assert scalars[f"priority/{key}"][-1][1] == pytest.approx(value, rel=1e-6)


def test_current_learning_rate_and_bad_update_freq():
    assert current_learning_rate(tf.keras.optimizers.SGD(0.25)) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="`update_freq` must be a positive integer"):
        TensorBoardMonitor("unused", comm=LocalComm(), update_freq=0)


@pytest.mark.parametrize("args, message", [
    ((np.zeros((3, 2)), np.zeros(4), None), "`x_test` and `y_test` must be non-empty with the "
                                            "same number of rows. Received: 3 and 4"),
    ((np.zeros((3, 2)), np.zeros(3), 1.5), "`target_accuracy` must be a finite number in "
                                           "[0.0, 1.0]. Received: target_accuracy=1.5"),
])
def test_accuracy_clock_rejects_bad_arguments(args, message):
    with pytest.raises(ValueError) as err:
        AccuracyClock(*args)
    assert str(err.value) == message
