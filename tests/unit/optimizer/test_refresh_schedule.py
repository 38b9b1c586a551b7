"""The refresh schedule (fixed and adaptive), request_refresh, and the warm refresh in DHO2."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from dho2_tf import DHO2, CurvatureRefresh, hybrid
from dho2_tf.distributed import LocalComm
from dho2_tf.refresh_schedule import RefreshSchedule

LOSS = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _drive(schedule: RefreshSchedule, steps: int, staleness: list[float]) -> tuple[list, list]:
    """Run the schedule like the modes do: (refresh steps, check steps)."""
    refreshes, checked = [], []
    values = iter(staleness)

    def check(t: int) -> float:
        checked.append(t)
        return next(values)

    count = 0
    for t in range(steps):
        if schedule.due(t, count, check):
            count += 1
            refreshes.append(t)
            schedule.refreshed(t, count)
    return refreshes, checked


def test_fixed_schedule_is_fosis() -> None:
    schedule = RefreshSchedule(warmup=10, refresh_every=15, max_refresh_every=None,
                               staleness_tol=0.1)
    refreshes, checked = _drive(schedule, 100, [])
    assert refreshes == [hybrid.next_refresh_step(j, 10, 15) for j in range(len(refreshes))]
    assert refreshes == [9, 24, 39, 54, 69, 84, 99] and checked == []


def test_adaptive_schedule_stretches_while_fresh_and_caps_at_the_maximum() -> None:
    """T = 10, T_max = 35, τ = 0.1: refresh 0 at W − 1 = 9; checks every 10 steps after a
    refresh; a check above τ refreshes, one below stretches; 35 steps after a refresh the
    refresh runs without a check."""
    schedule = RefreshSchedule(warmup=10, refresh_every=10, max_refresh_every=35,
                               staleness_tol=0.1)
    refreshes, checked = _drive(schedule, 120, [0.05, 0.2, 0.01, 0.02, 0.03, 0.5, 0.0, 0.0,
                                                0.0, 0.3])
    # 9: first; 19: 0.05 stretch; 29: 0.2 refresh; 39: 0.01, 49: 0.02, 59: 0.03 stretch;
    # 64 = 29 + 35: forced; 74: 0.5 refresh; 84, 94, 104: stretch; 109 = 74 + 35: forced;
    # 119: 0.3 refresh.
    assert checked == [19, 29, 39, 49, 59, 74, 84, 94, 104, 119]
    assert refreshes == [9, 29, 64, 74, 109, 119]
    assert schedule.checks == 10 and schedule.stretched == 7
    assert schedule.metrics()["refresh_interval"] == 10.0


def test_request_refresh_makes_the_next_step_due_and_replaces_the_scheduled_one() -> None:
    schedule = RefreshSchedule(warmup=10, refresh_every=15, max_refresh_every=None,
                               staleness_tol=0.1)
    count = 0
    steps = []
    for t in range(60):
        if t == 13:
            schedule.request_refresh("test guard")
        if schedule.due(t, count, lambda t: 0.0):
            count += 1
            steps.append(t)
            schedule.refreshed(t, count)
    assert steps == [9, 13, 39, 54] and schedule.metrics()["refresh_requests"] == 1.0


def test_a_restored_count_restarts_the_adaptive_interval() -> None:
    schedule = RefreshSchedule(warmup=1, refresh_every=10, max_refresh_every=40,
                               staleness_tol=0.1)
    schedule.sync(3, 200)   # a checkpoint with three refreshes, resumed at step 200
    checked = []
    assert not schedule.due(209, 3, lambda t: checked.append(t) or 0.0)
    assert schedule.due(210, 3, lambda t: checked.append(t) or 1.0) and checked == [210]


def _data():
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([tf.keras.Input((8,)), tf.keras.layers.Dense(16, "tanh"),
                                 tf.keras.layers.Dense(3)])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 8)).astype(np.float32)
    y = rng.integers(0, 3, 256)
    return model, x, y


def _fit(opt: DHO2, epochs: int = 1) -> list[dict]:
    model, x, y = _data()
    model.compile(optimizer=opt, loss=LOSS)
    records = []

    class Record(tf.keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            last = opt.last_refresh
            if last is not None and (not records or records[-1]["index"] != last["index"]):
                records.append(dict(last))

    model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0,
              callbacks=[CurvatureRefresh(batch=(x[:64], y[:64])), Record()])
    return records


@pytest.mark.parametrize("mode", ["replicated", "sharded", "faithful", "admm"])
def test_every_mode_refreshes_cold_then_warm(mode: str) -> None:
    opt = DHO2(learning_rate=0.05, base="momentum", k=3, ell=1, refresh_every=4, warmup=2,
               mode=mode, comm=LocalComm())
    records = _fit(opt)
    assert len(records) >= 3 and all(r["installed"] for r in records)
    assert records[0]["method"] == "lanczos" and records[0]["hvps"] == 16
    assert all(r["method"] == "warm" and r["hvps"] == 8 for r in records[1:])
    assert all(0.0 <= r["residual"] < 1.0 for r in records[1:])
    metrics = opt.curvature_metrics()
    assert metrics["refresh_warm"] == 1.0 and metrics["refresh_hvps"] == 8.0


def test_lanczos_method_runs_lanczos_every_time() -> None:
    opt = DHO2(learning_rate=0.05, base="momentum", k=3, refresh_every=4, warmup=2,
               refresh_method="lanczos", comm=LocalComm())
    records = _fit(opt)
    assert len(records) >= 3 and all(r["method"] == "lanczos" and r["hvps"] == 12
                                     for r in records)
    assert opt.binding["estimator"].block is None


def test_adaptive_dho2_decides_from_its_checks() -> None:
    opt = DHO2(learning_rate=0.05, base="momentum", k=3, refresh_every=3, warmup=1,
               max_refresh_every=12, staleness_tol=0.05, comm=LocalComm())
    decisions = []
    schedule = opt.curvature.schedule
    original = schedule.due

    def spy(t, count, check):
        before = (schedule.checks, schedule.stretched)
        result = original(t, count, check)
        if schedule.checks != before[0]:
            decisions.append((schedule.staleness, result))
        return result

    schedule.due = spy
    records = _fit(opt, epochs=2)
    assert decisions and all((s > 0.05) == refreshed for s, refreshed in decisions)
    metrics = opt.curvature_metrics()
    assert metrics["refresh_checks"] == len(decisions)
    assert metrics["refreshes"] == len(records)


@pytest.mark.parametrize("kwargs, message", [
    (dict(refresh_method="cold"), "`refresh_method` must be one of ('warm', 'lanczos'). "
                                  "Received: refresh_method='cold'"),
    (dict(max_refresh_every=5, refresh_every=10), "`max_refresh_every` must be"),
    (dict(max_refresh_every=200, mode="pipelined"), "not available with mode='pipelined'"),
    (dict(staleness_tol=0.0), "`staleness_tol` must be a finite number in \\(0.0"),
    (dict(block_hvp="loop"), "`block_hvp` must be one of ('map', 'vectorized')"),
    (dict(warm_extra=-1), "`warm_extra` must be a non-negative integer"),
])
def test_new_options_are_validated(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", "\\(").replace(")", "\\)")
                       if "\\(" not in message else message):
        DHO2(**kwargs)


def test_defaults_and_config_round_trip() -> None:
    opt = DHO2(comm=LocalComm())
    assert (opt.refresh_method, opt.warm_extra, opt.block_hvp, opt.max_refresh_every,
            opt.staleness_tol, opt.hvp_method) == ("warm", 0, "map", None, 0.1,
                                                   "forward-over-reverse")
    custom = DHO2(refresh_method="lanczos", warm_extra=2, block_hvp="vectorized",
                  max_refresh_every=300, staleness_tol=0.2, comm=LocalComm())
    again = DHO2.from_config(custom.get_config())
    assert (again.refresh_method, again.warm_extra, again.block_hvp, again.max_refresh_every,
            again.staleness_tol) == ("lanczos", 2, "vectorized", 300, 0.2)
