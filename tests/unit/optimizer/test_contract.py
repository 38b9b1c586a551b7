"""The Keras optimizer contract, for DHO2 in every mode that runs in a single process
(``pipelined`` needs a curvature rank besides the update ranks: the same checks run on 3
processes in ``tests/test_parallel_modes.py``, its ``contract`` check).

Before its first curvature refresh DHO2 with ``base="sgd"`` is exactly SGD (the class
``Math:``), so the Keras behaviours (gradient clipping, learning-rate schedules) are compared
with ``tf.keras.optimizers.SGD`` on the same gradients.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import tensorflow as tf

from dho2_tf import DHO2, LocalComm

MODES = ["auto", "sharded", "replicated", "faithful", "admm"]
LOSS = tf.keras.losses.MeanSquaredError()


def data(n=64, d=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype("float32")
    y = (np.tanh(x @ rng.standard_normal((d, 2))) + 3.0).astype("float32")
    return x, y


def model_of(seed=0, d=4, **dense_kw):
    tf.keras.utils.set_random_seed(seed)
    return tf.keras.Sequential([tf.keras.Input((d,)),
                                tf.keras.layers.Dense(5, activation="tanh"),
                                tf.keras.layers.Dense(2, **dense_kw)])


def make_opt(mode, **kw):
    # ADMM's penalty ρ(x − z) vanishes with a negligible ρ and no consensus round (τ large),
    # so every mode takes the same base step before the first refresh.
    params = dict(learning_rate=0.1, base="sgd", k=2, refresh_every=100, mode=mode,
                  rho=1e-12, tau=1000, comm=LocalComm())
    params.update(kw)
    return DHO2(**params)


def gradients(model, x, y):
    with tf.GradientTape() as tape:
        value = LOSS(y, model(x, training=True))
    return tape.gradient(value, model.trainable_variables)


def dho2_step(opt, model, grads):
    opt.on_step_begin()
    out = opt.apply_gradients(zip(grads, model.trainable_variables))
    opt.on_step_end()
    return out


def bound(mode, model, x, y, **kw):
    opt = make_opt(mode, **kw)
    opt.bind(model, LOSS, (x[:32], y[:32]))
    return opt


def weights(model):
    return [w.numpy().copy() for w in model.trainable_variables]


def check_iterations_and_none_gradients(opt, model, x, y):
    """Each apply_gradients advances ``iterations`` by one and returns it; a variable whose
    gradient is None does not move; the others take θ − lr·g (lr 0.1)."""
    for step in range(3):
        before = weights(model)
        grads = list(gradients(model, x, y))
        grads[1] = None                                   # first layer's bias
        out = dho2_step(opt, model, grads)
        assert int(out.numpy()) == int(opt.iterations.numpy()) == step + 1
        after = weights(model)
        np.testing.assert_array_equal(after[1], before[1])
        for i in (0, 2, 3):
            np.testing.assert_allclose(after[i], before[i] - 0.1 * grads[i].numpy(),
                                       rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_iterations_and_none_gradients(mode):
    x, y = data()
    model = model_of()
    check_iterations_and_none_gradients(bound(mode, model, x, y), model, x, y)


CLIPS = [{"clipnorm": 0.05}, {"clipvalue": 0.01}, {"global_clipnorm": 0.05}]


def check_gradient_clipping(opt, model, x, y, clip):
    """Two steps equal tf.keras.optimizers.SGD(0.1, **clip) on the same gradients."""
    reference = model_of()
    sgd = tf.keras.optimizers.SGD(learning_rate=0.1, **clip)
    for _ in range(2):
        grads = gradients(model, x, y)
        assert max(float(tf.norm(g)) for g in grads) > 0.05       # clipping is active
        dho2_step(opt, model, grads)
        sgd.apply_gradients(zip(gradients(reference, x, y), reference.trainable_variables))
        for a, b in zip(weights(model), weights(reference)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("clip", CLIPS)
def test_gradient_clipping_matches_keras(mode, clip):
    x, y = data()
    model = model_of()
    check_gradient_clipping(bound(mode, model, x, y, **clip), model, x, y, clip)


SCHEDULE = tf.keras.optimizers.schedules.ExponentialDecay(0.2, decay_steps=1, decay_rate=0.5)


def check_learning_rate_schedule(opt, model, x, y):
    """With ``learning_rate=SCHEDULE``, three steps equal Keras SGD with the same schedule."""
    reference = model_of()
    sgd = tf.keras.optimizers.SGD(learning_rate=SCHEDULE)
    for step in range(3):
        dho2_step(opt, model, gradients(model, x, y))
        sgd.apply_gradients(zip(gradients(reference, x, y), reference.trainable_variables))
        # As in Keras, ``learning_rate`` is the rate the last step used, lr(t) at its start.
        np.testing.assert_allclose(float(opt.learning_rate), 0.2 * 0.5 ** step, rtol=1e-6)
        np.testing.assert_allclose(float(opt.learning_rate), float(sgd.learning_rate),
                                   rtol=1e-6)
        for a, b in zip(weights(model), weights(reference)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_learning_rate_schedule_matches_keras(mode):
    x, y = data()
    model = model_of()
    check_learning_rate_schedule(bound(mode, model, x, y, learning_rate=SCHEDULE), model, x, y)


def check_constraints(opt, model, x, y):
    """kernel_constraint=NonNeg() on the output layer, learning rate 0.5, labels ``-y``: the
    constrained kernel is max(θ − lr·g, 0); the other variables take the plain step."""
    for _ in range(2):
        before = weights(model)
        grads = gradients(model, x, y)
        dho2_step(opt, model, grads)
        after = weights(model)
        free = before[2] - 0.5 * grads[2].numpy()
        assert np.any(free < 0)
        np.testing.assert_allclose(after[2], np.maximum(free, 0.0), rtol=1e-5, atol=1e-6)
        for i in (0, 1, 3):
            np.testing.assert_allclose(after[i], before[i] - 0.5 * grads[i].numpy(),
                                       rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_constraints_applied(mode):
    x, y = data()
    y = -y                                                 # drives the output kernel negative
    model = model_of(kernel_constraint=tf.keras.constraints.NonNeg())
    check_constraints(bound(mode, model, x, y, learning_rate=0.5), model, x, y)


def train(opt, model, x, y, steps):
    for step in range(steps):
        batch = slice(8 * (step % 8), 8 * (step % 8) + 8)
        dho2_step(opt, model, gradients(model, x[batch], y[batch]))


CURVATURE = dict(base="adam", learning_rate=0.01, refresh_every=3, warmup=2, alpha=0.5)


@pytest.mark.parametrize("mode", MODES)
def test_checkpoint_round_trip(mode, tmp_path):
    """A tf.train.Checkpoint of model and optimizer (after refreshes) restores every optimizer
    variable, and training continues exactly as the original does."""
    x, y = data()
    model = model_of()
    opt = bound(mode, model, x, y, **CURVATURE)
    train(opt, model, x, y, 5)
    assert opt.refresh_index() == 2
    path = tf.train.Checkpoint(model=model, optimizer=opt).save(str(tmp_path / "ckpt"))

    restored_model = model_of(seed=1)
    restored = bound(mode, restored_model, x, y, **CURVATURE)
    tf.train.Checkpoint(model=restored_model, optimizer=restored).restore(path)
    restored.sync_host_state()
    assert [v.name for v in restored.variables] == [v.name for v in opt.variables]
    for a, b in zip(restored.variables, opt.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    train(opt, model, x, y, 4)
    train(restored, restored_model, x, y, 4)
    assert restored.refresh_index() == opt.refresh_index() == 3
    for a, b in zip(weights(restored_model), weights(model)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_set_weights_round_trip(mode):
    """set_weights([v.numpy() for v in opt.variables]) on another optimizer makes it continue
    exactly as the original, even when it had trained on its own before."""
    x, y = data()
    model, other_model = model_of(), model_of()
    opt = bound(mode, model, x, y, **CURVATURE)
    other = bound(mode, other_model, x, y, **CURVATURE)
    train(opt, model, x, y, 5)
    train(other, other_model, x[::-1], y[::-1], 5)     # other state, same refresh count
    other.set_weights([v.numpy() for v in opt.variables])
    other_model.set_weights(model.get_weights())
    for a, b in zip(other.variables, opt.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert other.refresh_index() == 2
    train(opt, model, x, y, 4)
    train(other, other_model, x, y, 4)
    for a, b in zip(weights(other_model), weights(model)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def check_config_round_trip(opt):
    """from_config(get_config()) and Keras' serialize/deserialize give the same config; the
    clone from ``from_config``."""
    config = opt.get_config()
    clone = DHO2.from_config(copy.deepcopy(config))   # Keras deserialises in place
    assert clone.get_config() == config
    again = tf.keras.optimizers.deserialize(tf.keras.optimizers.serialize(opt),
                                            use_legacy_optimizer=False)
    assert isinstance(again, DHO2) and again.get_config() == config
    return clone


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("schedule", [False, True])
def test_config_round_trip(mode, schedule):
    lr = tf.keras.optimizers.schedules.CosineDecay(0.1, decay_steps=50) if schedule else 0.05
    opt = make_opt(mode, learning_rate=lr, clipnorm=1.5, max_consecutive_skips=9, k=3, ell=1)
    clone = check_config_round_trip(opt)
    assert clone.clipnorm == 1.5 and clone.max_consecutive_skips == 9 and clone.mode == mode
    if schedule:
        assert float(clone.learning_rate) == pytest.approx(0.1)
        assert isinstance(clone._learning_rate,
                          tf.keras.optimizers.schedules.LearningRateSchedule)
