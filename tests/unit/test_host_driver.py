"""The host-side driver (dho2_tf.host_driver.HostDriver): fit and a custom loop take the same
steps through it, its step count is the only one, and its resync re-reads every host cache."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from dho2_tf import CurvatureRefresh, training_loop
from tests.helpers.steps import train_step
from tests.unit.optimizer.test_keras_integration import LOSS, make_opt, toy_data, toy_model

# make_opt: W = 4, T = 8, so refresh j is due before update 3 + 8j.
BATCH = 32


def batches(x, y, epochs):
    for _ in range(epochs):
        for i in range(0, len(x), BATCH):
            yield x[i:i + BATCH], y[i:i + BATCH]


class RecordRefreshSteps:
    """``on_refresh`` of CurvatureRefresh: the optimizer's step counter at each refresh."""

    def __init__(self, opt):
        self.opt, self.steps = opt, []

    def __call__(self, info):
        self.steps.append(int(self.opt.iterations.numpy()))


def loop_run(opt, model, x, y, epochs, between_epochs=None):
    """Train in training_loop; returns the optimizer's step counter before each refresh."""
    step, steps = train_step(model, opt, LOSS), []
    per_epoch = len(x) // BATCH
    with training_loop(opt, model, LOSS, (x[:64], y[:64])) as loop:
        for i, (xb, yb) in enumerate(batches(x, y, epochs)):
            if i and i % per_epoch == 0 and between_epochs is not None:
                between_epochs(loop)
            before = opt.refresh_index()
            at = int(opt.iterations.numpy())
            loop.step(step, xb, yb)
            if opt.refresh_index() > before:
                steps.append(at)
    return loop, steps


def test_fit_and_training_loop_refresh_at_the_same_steps_and_end_equal():
    """ADMM (τ = 3) on a batch-norm model: the refreshes, the consensus rounds and the final
    consensus weights of fit with CurvatureRefresh and of training_loop agree."""
    x, y = toy_data()
    fit_model, fit_opt = toy_model(batch_norm=True), make_opt(mode="admm", tau=3)
    fit_model.compile(optimizer=fit_opt, loss=LOSS)
    record = RecordRefreshSteps(fit_opt)
    cb = CurvatureRefresh(batch=(x[:64], y[:64]), on_refresh=record)
    fit_model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0, callbacks=[cb])

    loop_model, loop_opt = toy_model(batch_norm=True), make_opt(mode="admm", tau=3)
    loop, loop_steps = loop_run(loop_opt, loop_model, x, y, epochs=2)

    assert record.steps == loop_steps == [3, 11]
    assert [r["index"] for r in cb.refreshes] == [0, 1]
    assert int(fit_opt.distribution.rounds.numpy()) == int(
        loop_opt.distribution.rounds.numpy()) == 16 // 3
    assert loop.iterations == fit_opt.driver.iterations == loop_opt.driver.iterations == 16
    for a, b in zip(fit_model.get_weights(), loop_model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


class SetIterations(tf.keras.callbacks.Callback):
    """At the start of epoch 2, set the optimizer's step counter to ``to`` (a restore), at
    ``epoch_end`` of epoch 1 or at ``epoch_begin`` of epoch 2 (then followed by
    ``sync_host_state``, as a checkpoint restore does)."""

    def __init__(self, to, hook):
        super().__init__()
        self.to, self.hook = to, hook

    def on_epoch_end(self, epoch, logs=None):
        if self.hook == "epoch_end" and epoch == 0:
            self.model.optimizer.iterations.assign(self.to)

    def on_epoch_begin(self, epoch, logs=None):
        if self.hook == "epoch_begin" and epoch == 1:
            self.model.optimizer.iterations.assign(self.to)
            self.model.optimizer.sync_host_state()


@pytest.mark.parametrize("hook", ["epoch_end", "epoch_begin"])
def test_the_next_refresh_follows_a_step_count_restored_at_an_epoch_boundary(hook):
    """8 steps, then the counter goes back to 6: refresh 1 (due before update 11) runs when
    the counter reads 11, the 6th batch of epoch 2, also when the restoring callback runs
    after CurvatureRefresh's own epoch start (there is one step count, not one per caller)."""
    x, y = toy_data()
    model, opt = toy_model(), make_opt()
    model.compile(optimizer=opt, loss=LOSS)
    record = RecordRefreshSteps(opt)
    cb = CurvatureRefresh(batch=(x[:64], y[:64]), on_refresh=record)
    model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0,
              callbacks=[cb, SetIterations(6, hook)])
    assert record.steps == [3, 11] and [r["index"] for r in cb.refreshes] == [0, 1]
    assert int(opt.iterations.numpy()) == opt.driver.iterations == 6 + 8


def test_training_loop_follows_a_step_count_restored_between_steps():
    x, y = toy_data()
    model, opt = toy_model(), make_opt()

    def restore(loop):
        opt.iterations.assign(6)
        loop.sync()
        assert loop.iterations == 6

    loop, steps = loop_run(opt, model, x, y, epochs=2, between_epochs=restore)
    assert steps == [3, 11] and loop.iterations == int(opt.iterations.numpy()) == 14


@pytest.mark.parametrize("mode, restore", [("sharded", "set_weights"), ("admm", "import_state")])
def test_a_restored_state_is_re_read_and_retrains_identically(mode, restore):
    """Restore the step-0 state after 8 steps (1 refresh done): resync forgets the refresh
    count (and admm's z ← x flag), so the next 8 steps refresh at step 3 again and end on the
    weights of the first 8."""
    x, y = toy_data()
    model, opt = toy_model(), make_opt(mode=mode, tau=3)
    step = train_step(model, opt, LOSS)
    data = list(batches(x, y, epochs=1))
    with training_loop(opt, model, LOSS, (x[:64], y[:64])) as loop:
        weights0 = model.get_weights()
        state0 = ([v.numpy() for v in opt.variables] if restore == "set_weights"
                  else opt.export_state())
        runs = []
        for run in range(2):
            refreshed = []
            for t, (xb, yb) in enumerate(data):
                before = opt.refresh_index()
                loop.step(step, xb, yb)
                if opt.refresh_index() > before:
                    refreshed.append((t, opt.last_refresh["index"]))
            runs.append((refreshed, [w.copy() for w in model.get_weights()]))
            if run == 0:
                assert opt.curvature.host_refreshes == 1 and loop.iterations == 8
                model.set_weights(weights0)
                if restore == "set_weights":
                    opt.set_weights(state0)
                else:
                    opt.import_state(state0)
                assert opt.curvature.host_refreshes is None and loop.iterations == 0
    assert runs[0][0] == runs[1][0] == [(3, 0)]
    for a, b in zip(runs[0][1], runs[1][1]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_a_hand_wired_loop_re_reads_the_step_count_every_step():
    """on_step_begin()/on_step_end() without a count: the counter set between two steps is the
    one the schedule sees at the next (refreshes 0 and 1 are due from updates 3 and 11)."""
    x, y = toy_data()
    model, opt = toy_model(), make_opt()
    opt.bind(model, LOSS, (x[:64], y[:64]))
    step = train_step(model, opt, LOSS)
    refreshed = []
    for t, (xb, yb) in enumerate(batches(x, y, epochs=1)):
        if t == 2:
            opt.iterations.assign(10)
        before, at = opt.refresh_index(), int(opt.iterations.numpy())
        opt.on_step_begin()
        step(xb, yb)
        opt.on_step_end()
        assert opt.driver.iterations is None   # nothing kept between hand-wired steps
        if opt.refresh_index() > before:
            refreshed.append(at)
    assert refreshed == [10, 11] and int(opt.iterations.numpy()) == 16


def test_a_hand_wired_loop_without_on_step_begin_is_refused_when_a_refresh_is_due():
    x, y = toy_data()
    model, opt = toy_model(), make_opt()
    opt.bind(model, LOSS, (x[:64], y[:64]))
    step = train_step(model, opt, LOSS)
    for xb, yb in list(batches(x, y, epochs=1))[:3]:
        step(xb, yb)
    with pytest.raises(tf.errors.InvalidArgumentError, match="on_step_begin"):
        step(x[:BATCH], y[:BATCH])
    assert int(opt.iterations.numpy()) == 3   # the refused update was not applied


def test_consistency_is_checked_once(monkeypatch):
    model, opt = toy_model(), make_opt()
    opt.build(model.trainable_variables)
    calls = []
    monkeypatch.setattr(type(opt), "verify_consistency",
                        lambda self, m, fit=None: (calls.append(m),
                                                   setattr(self, "consistency_checked", True)))
    opt.ensure_consistency()
    opt.ensure_consistency(model)
    assert len(calls) == 1 and calls[0].name == "model"
    assert [v.ref() for v in calls[0].trainable_variables] == [
        v.ref() for v in model.trainable_variables]
