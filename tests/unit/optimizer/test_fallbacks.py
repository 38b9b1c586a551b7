"""No quiet fallbacks: a missing curvature source warns, skipped steps are logged, counted and
bounded, and variable constraints are applied after every step."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from dho2_tf import DHO2, CurvatureRefresh, LocalComm
from tests.helpers.job_output import rank_output
from tests.helpers.launch import run_horovod


def data(n=128, d=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype("float32")
    y = (x @ rng.standard_normal((d, 1))).astype("float32")
    return x, y


def dense_model(d=6, seed=0, **dense_kw):
    tf.keras.utils.set_random_seed(seed)
    return tf.keras.Sequential([tf.keras.Input((d,)), tf.keras.layers.Dense(8, activation="tanh"),
                                tf.keras.layers.Dense(1, **dense_kw)])


def make_opt(**kw):
    params = dict(learning_rate=0.01, base="momentum", k=2, refresh_every=4, warmup=3,
                  comm=LocalComm())
    params.update(kw)
    return DHO2(**params)


def dho2_warnings(caplog, text):
    return [r for r in caplog.records if r.name.startswith("dho2_tf") and text in r.getMessage()]


def test_fit_without_curvature_source_warns_once_and_checks_ranks(caplog):
    x, y = data()
    opt = make_opt()
    model = dense_model()
    model.compile(optimizer=opt, loss="mse")
    with caplog.at_level(logging.WARNING, logger="dho2_tf"):
        # W = 3: the first refresh is due before update 2 (0-based); two steps come before it.
        model.fit(x, y, batch_size=64, epochs=1, verbose=0)
        assert not dho2_warnings(caplog, "no curvature source")
        assert not getattr(opt, "consistency_checked", False)
        model.fit(x, y, batch_size=32, epochs=3, verbose=0)
    warned = dho2_warnings(caplog, "no curvature source")
    assert len(warned) == 1
    message = warned[0].getMessage()
    assert "CurvatureRefresh" in message and "bind" in message and "step 2" in message
    assert opt.consistency_checked       # the rank check ran in this path too
    assert opt.refresh_index() == 0 and int(opt.iterations.numpy()) == 14


def test_bound_fit_does_not_warn(caplog):
    x, y = data()
    opt = make_opt()
    model = dense_model()
    model.compile(optimizer=opt, loss="mse")
    with caplog.at_level(logging.WARNING, logger="dho2_tf"):
        model.fit(x, y, batch_size=32, epochs=2, verbose=0,
                  callbacks=[CurvatureRefresh(batch=(x[:32], y[:32]))])
    assert not dho2_warnings(caplog, "no curvature source")
    assert opt.refresh_index() == 2


@pytest.mark.parametrize("bound", [False, True])
def test_skipped_steps_logged_and_counted_without_statistics(caplog, bound):
    """A model with no non-trainable variables: every skipped step is counted, the first logged."""
    x, y = data()
    y_bad = y.copy()
    y_bad[32:64] = np.nan                      # the second batch of each epoch
    model = dense_model()
    assert not model.non_trainable_variables
    opt = make_opt(refresh_every=100)
    model.compile(optimizer=opt, loss="mse")
    callbacks = [CurvatureRefresh(batch=(x[:32], y[:32]))] if bound else []
    before = [w.numpy().copy() for w in model.trainable_variables]
    with caplog.at_level(logging.WARNING, logger="dho2_tf"):
        model.fit(x, y_bad, batch_size=32, epochs=2, shuffle=False, verbose=0,
                  callbacks=callbacks)
    assert int(opt.state.skipped.numpy()) == 2
    assert opt.curvature_metrics()["skipped_steps"] == 2.0
    logged = dho2_warnings(caplog, "skipped step")
    # The first skip is logged (steps counted from 1), the next only in the summaries.
    assert [int(r.args[0]) for r in logged] == [2]
    assert all(np.all(np.isfinite(w.numpy())) for w in model.trainable_variables)
    assert any(not np.allclose(a, w.numpy()) for a, w in zip(before, model.trainable_variables))


def test_too_many_consecutive_skips_stop_training():
    x, y = data()
    y_bad = y.copy()
    y_bad[32:] = np.nan                        # batches 2.. of every epoch are broken
    model = dense_model()
    opt = make_opt(max_consecutive_skips=2, refresh_every=100)
    model.compile(optimizer=opt, loss="mse")
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_consecutive_skips=2"):
        model.fit(x, y_bad, batch_size=32, epochs=2, shuffle=False, verbose=0)
    # Steps 2 and 3 were skipped and tolerated; the third consecutive skip (step 4) stopped.
    assert int(opt.state.skipped.numpy()) == 3
    # The weights are those of the only applied step (step 1), not NaN.
    assert all(np.all(np.isfinite(w.numpy())) for w in model.trainable_variables)


def test_isolated_skips_below_the_limit_keep_training():
    x, y = data()
    y_bad = y.copy()
    y_bad[32:64] = np.nan
    model = dense_model()
    opt = make_opt(max_consecutive_skips=1, refresh_every=100)
    model.compile(optimizer=opt, loss="mse")
    model.fit(x, y_bad, batch_size=32, epochs=3, shuffle=False, verbose=0)
    assert int(opt.state.skipped.numpy()) == 3 and int(opt.iterations.numpy()) == 12


@pytest.mark.parametrize("value", [0, -1, 1.5, None, True])
def test_max_consecutive_skips_validated(value):
    with pytest.raises(ValueError, match="max_consecutive_skips"):
        DHO2(max_consecutive_skips=value, comm=LocalComm())


def test_max_consecutive_skips_in_config():
    opt = make_opt(max_consecutive_skips=7)
    config = opt.get_config()
    assert config["max_consecutive_skips"] == 7
    assert DHO2.from_config(config).max_consecutive_skips == 7


def test_constraints_applied_after_every_step():
    """kernel_constraint=NonNeg(): after each step the kernel equals max(θ + δ, 0), where the
    unconstrained step θ + δ is that of an identical model without the constraint."""
    x, y = data()
    y = -np.abs(y) - 1.0                       # pushes the output kernel negative
    constrained = dense_model(kernel_constraint=tf.keras.constraints.NonNeg())
    free = dense_model()
    opts = [make_opt(learning_rate=0.2, refresh_every=2, warmup=1) for _ in range(2)]
    loss = tf.keras.losses.MeanSquaredError()
    for model, opt in zip((constrained, free), opts):
        opt.bind(model, loss, (x[:32], y[:32]))
    kernel = constrained.layers[-1].kernel
    for step in range(4):
        batch = slice(32 * step, 32 * step + 32)
        for model, opt in zip((constrained, free), opts):
            opt.on_step_begin()
            with tf.GradientTape() as tape:
                value = loss(y[batch], model(x[batch], training=True))
            grads = tape.gradient(value, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables))
            opt.on_step_end()
        expected = np.maximum(free.layers[-1].kernel.numpy(), 0.0)
        np.testing.assert_allclose(kernel.numpy(), expected, atol=1e-6)
        assert np.any(free.layers[-1].kernel.numpy() < 0)
        # Continue both from the constrained weights, so each step is compared from one point.
        for a, b in zip(free.trainable_variables, constrained.trainable_variables):
            a.assign(b)
    assert opts[0].refresh_index() >= 1


NO_SOURCE = Path(__file__).with_name("no_source_run.py")


@pytest.mark.parallel
def test_no_curvature_source_warns_on_every_rank_under_horovodrun():
    proc = run_horovod(NO_SOURCE, 2, args=("same",), timeout=120)
    for rank in (0, 1):
        warnings = [line for line in proc.stdout.splitlines()
                    if f"rank {rank} LOG" in line and "no curvature source" in line]
        assert len(warnings) == 1, proc.stdout
        assert "CurvatureRefresh" in warnings[0] and "bind" in warnings[0]
        assert f"rank {rank} DONE iterations=12 refreshes=0 checked=True" in proc.stdout


@pytest.mark.parallel
def test_no_curvature_source_rank_check_errors_on_every_rank():
    start = time.monotonic()
    proc = run_horovod(NO_SOURCE, 2, args=("mismatch",), timeout=120)
    assert time.monotonic() - start < 60
    for rank in (0, 1):
        text = "\n".join(rank_output(proc.stdout, rank))
        assert f"rank {rank} FIT_ERROR" in text, proc.stdout
        assert "optimizer.k: rank 0: 2; rank 1: 3" in text, text
        assert f"rank {rank} DONE" not in text
