"""Non-finite guards, rank-consistency fingerprint (one process) and state export/import."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from dho2_tf import DHO2, CurvatureRefresh, LocalComm
from tests.helpers.steps import train_step
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
    assert opt.refresh_index() == 4 and np.any(opt.state.eigenvalues.numpy() != 0)


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


def test_non_finite_curvature_estimate_keeps_previous_eigenpairs():
    x, y = toy_data()
    model = toy_model()
    opt = DHO2(learning_rate=0.05, k=2, refresh_every=100, comm=LocalComm())
    opt.bind(model, LOSS, (x[:64], y[:64]))
    opt.refresh_curvature()
    good = opt.state.eigenvalues.numpy().copy()
    x_bad = x[:64].copy()
    x_bad[0, 0] = np.inf
    with pytest.raises(ValueError, match=r"NaN/Inf in 1 row\(s\): 0"):  # refused at bind
        opt.bind(model, LOSS, (x_bad, y[:64]))
    # A non-finite Hessian at the current weights: every HVP of the refresh is non-finite.
    kernel = model.trainable_variables[0]
    saved = kernel.numpy()
    kernel.assign(np.full_like(saved, np.inf))
    info = opt.refresh_curvature()
    kernel.assign(saved)
    assert info["status"].startswith("non-finite") and not info["installed"]
    np.testing.assert_array_equal(opt.state.eigenvalues.numpy(), good)
    assert np.all(np.isfinite(opt.state.eigenvectors.numpy()))


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
    opt = DHO2(k=2, mode="sharded", comm=LocalComm())
    opt.build(model.trainable_variables)
    state = opt.export_state()
    other = DHO2(k=2, mode="faithful", comm=LocalComm())
    other.build(model.trainable_variables)
    with pytest.raises(ValueError, match="state is for mode='sharded'"):
        other.import_state(state)


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("refreshed", [False, True])
def test_in_place_adam_skips_a_non_finite_gradient_without_touching_its_slots(
        value, refreshed, monkeypatch):
    """Adam's fused in-place kernel runs only once every rank knows Ḡ is finite (from V Ḡ,
    also with the zero V before the first refresh)."""
    import dho2_tf.optimizer_state as optimizer_module

    monkeypatch.setattr(optimizer_module, "IN_PLACE_MIN_SIZE", 1)
    x, y = toy_data()
    model = toy_model()
    opt = DHO2(learning_rate=0.05, base="adam", k=2, refresh_every=100, comm=LocalComm())
    opt.bind(model, LOSS, (x[:64], y[:64]))
    assert opt.state.in_place
    step = tf.function(lambda grads: opt.apply_gradients(zip(grads, model.trainable_variables)))
    good = [tf.ones_like(v) * 0.01 for v in model.trainable_variables]
    step(good)
    if refreshed:
        opt.refresh_curvature()
        step(good)
    names = [v.name for v in model.trainable_variables + opt.variables]
    before = [v.numpy().copy() for v in model.trainable_variables + opt.variables]
    bad = [tf.tensor_scatter_nd_update(g, [[0] * len(g.shape)], [value]) for g in good]
    step(bad)
    after = [v.numpy() for v in model.trainable_variables + opt.variables]
    changed = sorted(n for n, b, a in zip(names, before, after) if not np.array_equal(a, b))
    assert changed == ["iteration:0", "skipped_steps:0"]
    step(good)                                  # and the next finite step is applied
    assert int(opt.state.skipped.numpy()) == 1
    assert not np.array_equal(model.trainable_variables[0].numpy(), after[0])


def test_batch_norm_statistics_of_a_skipped_step_are_restored_in_a_custom_loop():
    x, y = toy_data()
    model = toy_model(batch_norm=True)
    opt = DHO2(learning_rate=0.05, base="momentum", k=2, refresh_every=4, warmup=2,
               comm=LocalComm())
    opt.bind(model, LOSS, (x[:64], y[:64]))

    step = train_step(model, opt, LOSS)

    for t in range(6):
        opt.on_step_begin()
        xb = x[t * 32:(t + 1) * 32].copy()
        stats = [v.numpy().copy() for v in model.non_trainable_variables]
        if t == 4:
            xb[:] = np.nan
        step(xb, y[t * 32:(t + 1) * 32])
        opt.on_step_end()
        if t == 4:
            for before, var in zip(stats, model.non_trainable_variables):
                np.testing.assert_array_equal(before, var.numpy())
    assert int(opt.state.skipped.numpy()) == 1
    assert all(np.all(np.isfinite(v.numpy())) for v in model.variables)


@pytest.mark.parametrize("first,second", [("sharded", "replicated"), ("replicated", "sharded")])
def test_sharded_and_replicated_states_load_into_each_other(first, second):
    x, y = toy_data()
    runs = []
    for switch in (False, True):
        model = toy_model()
        opt = DHO2(learning_rate=0.05, base="momentum", k=3, refresh_every=5, warmup=2,
                   mode=first, comm=LocalComm())
        model.compile(optimizer=opt, loss=LOSS)
        cb = dict(batch=(x[:64], y[:64]))
        model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0,
                  callbacks=[CurvatureRefresh(**cb)])
        if switch:
            state = opt.export_state()
            assert state["__mode__"] == first
            opt = DHO2.from_config({**opt.get_config(), "mode": second})
            opt._comm = LocalComm()
            weights = model.get_weights()
            model = toy_model(seed=5)
            model.set_weights(weights)
            model.compile(optimizer=opt, loss=LOSS)
            opt.build(model.trainable_variables)
            opt.import_state(state)
            assert opt.resolved_mode == second
        model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0,
                  callbacks=[CurvatureRefresh(**cb)])
        runs.append(model.get_weights())
    for a, b in zip(*runs):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_fit_reads_no_optimizer_variable_between_refreshes(monkeypatch):
    """The per-step hooks of CurvatureRefresh compare Python ints: reads happen only at the
    first batch of an epoch, at refreshes and at epoch ends."""
    from tensorflow.python.ops import resource_variable_ops

    x, y = toy_data()
    model = toy_model()
    opt = DHO2(learning_rate=0.05, base="momentum", k=2, refresh_every=12, warmup=3,
               comm=LocalComm())
    model.compile(optimizer=opt, loss=LOSS)
    opt.build(model.trainable_variables)
    mine = {id(v) for v in opt.variables}
    reads = []
    original = resource_variable_ops.BaseResourceVariable.numpy

    def counting_numpy(self):
        if id(self) in mine:
            reads.append(self.name)
        return original(self)

    monkeypatch.setattr(resource_variable_ops.BaseResourceVariable, "numpy", counting_numpy)
    cb = CurvatureRefresh(batch=(x[:64], y[:64]))
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[cb])
    seen = list(reads)
    assert int(opt.iterations.numpy()) == 32 and [r["index"] for r in cb.refreshes] == [0, 1, 2]
    # The step count: once at the start (initial broadcast) and at each epoch's first batch;
    # the skipped count at each epoch end and at the end of training; the refresh count at
    # those syncs and in each refresh's own bookkeeping (with λ, c, and Γ and λ of the pairs a
    # warm refresh starts from). Nothing per step (32 steps).
    assert seen.count("iteration:0") == 1 + 2, seen
    assert seen.count("skipped_steps:0") == 2 + 1, seen
    assert len(seen) <= 3 + 3 + 2 + 3 * 6, seen


def test_steps_per_execution_keeps_the_refresh_schedule():
    """Keras runs several steps per hook call: the host step count follows them."""
    x, y = toy_data()
    model = toy_model()
    opt = DHO2(learning_rate=0.05, base="momentum", k=2, refresh_every=8, warmup=4,
               comm=LocalComm())
    model.compile(optimizer=opt, loss=LOSS, steps_per_execution=4)
    cb = CurvatureRefresh(batch=(x[:64], y[:64]))
    model.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0, callbacks=[cb])
    assert int(opt.iterations.numpy()) == 24 and opt.driver.iterations == 24
    # Hooks run before updates 0, 4, ..., 20; refreshes are due from t = 3, 11, 19.
    assert [r["index"] for r in cb.refreshes] == [0, 1, 2] and opt.refresh_index() == 3
