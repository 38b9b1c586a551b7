"""Non-finite guards, rank-consistency fingerprint (one process) and state export/import."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from dho2_tf import DHO2, CurvatureRefresh, LocalComm
from tests.unit.optimizer.test_keras_integration import LOSS, toy_data, toy_model


def poisoned(x, y, batch=32, which=3):
    x = x.copy()
    x[which * batch:(which + 1) * batch] = np.nan
    return x, y


@pytest.mark.parametrize("batch_norm", [False, True])
def test_poisoned_batch_is_skipped_and_nothing_turns_non_finite(batch_norm):
    x, y = toy_data()
    xp, yp = poisoned(x, y)
    model = toy_model(batch_norm=batch_norm)
    opt = DHO2(learning_rate=0.05, base="momentum", k=3, refresh_every=4, warmup=2,
               comm=LocalComm())
    model.compile(optimizer=opt, loss=LOSS)
    model.fit(xp, yp, batch_size=32, epochs=2, shuffle=False, verbose=0,
              callbacks=[CurvatureRefresh(batch=(x[:64], y[:64]))])
    assert int(opt.iterations.numpy()) == 16
    assert opt.curvature_metrics()["skipped_steps"] == 2.0          # batch 3 of each epoch
    for var in model.variables + opt.variables:
        assert np.all(np.isfinite(var.numpy())), var.name
    assert opt.refresh_index() == 4 and np.any(opt._eigenvalues.numpy() != 0)


def test_skipped_step_changes_no_weight_and_no_slot():
    x, y = toy_data()
    model = toy_model()
    opt = DHO2(learning_rate=0.05, base="adam", k=2, refresh_every=100, comm=LocalComm())
    opt.build(model.trainable_variables)
    before = [v.numpy().copy() for v in model.trainable_variables + opt.variables]
    grads = [tf.fill(v.shape, np.nan) for v in model.trainable_variables]
    opt.apply_gradients(zip(grads, model.trainable_variables))
    after = [v.numpy() for v in model.trainable_variables + opt.variables]
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if not np.array_equal(a, b)]
    names = [v.name for v in model.trainable_variables + opt.variables]
    assert sorted(names[i] for i in changed) == sorted(["iteration:0", "skipped_steps:0"])


def test_policy_raise_stops_with_a_clear_error():
    x, y = toy_data()
    xp, yp = poisoned(x, y)
    model = toy_model()
    model.compile(optimizer=DHO2(learning_rate=0.05, k=2, nonfinite="raise", comm=LocalComm()),
                  loss=LOSS)
    with pytest.raises(tf.errors.InvalidArgumentError, match="holds NaN/Inf at this step"):
        model.fit(xp, yp, batch_size=32, epochs=1, shuffle=False, verbose=0,
                  callbacks=[CurvatureRefresh(batch=(x[:64], y[:64]))])


def test_non_finite_curvature_batch_keeps_previous_eigenpairs():
    x, y = toy_data()
    model = toy_model()
    opt = DHO2(learning_rate=0.05, k=2, refresh_every=100, comm=LocalComm())
    opt.bind(model, LOSS, (x[:64], y[:64]))
    opt.refresh_curvature()
    good = opt._eigenvalues.numpy().copy()
    x_bad = x[:64].copy()
    x_bad[0, 0] = np.inf
    opt.bind(model, LOSS, (x_bad, y[:64]))
    info = opt.refresh_curvature()
    assert info["status"].startswith("non-finite") and not info["installed"]
    np.testing.assert_array_equal(opt._eigenvalues.numpy(), good)
    assert np.all(np.isfinite(opt._eigenvectors.numpy()))


def test_bad_nonfinite_policy_is_rejected():
    with pytest.raises(ValueError, match=r"`nonfinite` must be one of \('skip', 'raise'\). "
                                         r"Received: nonfinite='ignore'"):
        DHO2(nonfinite="ignore")


def test_export_import_round_trip_continues_identically():
    x, y = toy_data()
    runs = []
    for split in (False, True):
        model = toy_model()
        opt = DHO2(learning_rate=0.05, base="adam", k=3, refresh_every=5, warmup=2,
                   comm=LocalComm())
        model.compile(optimizer=opt, loss=LOSS)
        cb = dict(batch=(x[:64], y[:64]))
        model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0,
                  callbacks=[CurvatureRefresh(**cb)])
        if split:   # a fresh optimizer and model, restored from the exported state
            state, weights = opt.export_state(), model.get_weights()
            model = toy_model(seed=99)
            model.set_weights(weights)
            opt = DHO2.from_config(opt.get_config())
            opt._comm = LocalComm()
            model.compile(optimizer=opt, loss=LOSS)
            opt.build(model.trainable_variables)
            opt.import_state(state)
        model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0,
                  callbacks=[CurvatureRefresh(**cb)])
        runs.append(model.get_weights())
    for a, b in zip(*runs):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_import_rejects_other_mode():
    model = toy_model()
    opt = DHO2(k=2, comm=LocalComm())
    opt.build(model.trainable_variables)
    state = opt.export_state()
    other = DHO2(k=2, mode="faithful", comm=LocalComm())
    other.build(model.trainable_variables)
    with pytest.raises(ValueError, match="state is for mode='sharded'"):
        other.import_state(state)
