"""DHO2 inside Keras: compile/fit, custom loops, save/load-and-continue, config round trip."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import dho2_tf
from dho2_tf import DHO2, CurvatureRefresh, LocalComm, training_loop
from tests.helpers.steps import train_step


def toy_data(n=256, d=8, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((d, classes))
    x = rng.standard_normal((n, d)).astype("float32")
    y = np.argmax(x @ w + 0.3 * rng.standard_normal((n, classes)), axis=1).astype("int32")
    return x, y


def toy_model(d=8, classes=3, seed=0, batch_norm=False):
    tf.keras.utils.set_random_seed(seed)
    layers = [tf.keras.Input((d,)), tf.keras.layers.Dense(16, activation="tanh")]
    if batch_norm:
        layers.append(tf.keras.layers.BatchNormalization())
    layers.append(tf.keras.layers.Dense(classes))
    return tf.keras.Sequential(layers)


LOSS = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def compiled(opt, **kw):
    model = toy_model(**kw)
    model.compile(optimizer=opt, loss=LOSS, metrics=["accuracy"])
    return model


def make_opt(**kw):
    params = dict(learning_rate=0.05, base="momentum", k=3, refresh_every=8, warmup=4,
                  comm=LocalComm())
    params.update(kw)
    return DHO2(**params)


def test_compile_fit_trains_and_refreshes():
    x, y = toy_data()
    model = compiled(make_opt())
    cb = CurvatureRefresh(batch=(x[:64], y[:64]))
    loss0 = model.evaluate(x, y, verbose=0)[0]
    hist = model.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0, callbacks=[cb])
    assert hist.history["loss"][-1] < 0.7 * loss0
    # 24 steps, W = 4, T = 8: refreshes before updates 3, 11, 19.
    assert [r["index"] for r in cb.refreshes] == [0, 1, 2]
    assert all(r["installed"] for r in cb.refreshes)
    assert int(model.optimizer.iterations.numpy()) == 24
    assert np.all(model.optimizer.state.eigenvalues.numpy() > 0)


def test_fit_equals_custom_loop():
    """fit() and a hand-written loop calling bind/on_step_begin/apply_gradients agree."""
    x, y = toy_data()
    model_a = compiled(make_opt())
    model_a.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0,
                callbacks=[CurvatureRefresh(batch=(x[:64], y[:64]))])

    model_b = toy_model()
    opt = make_opt()
    opt.bind(model_b, LOSS, (x[:64], y[:64]))

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = LOSS(yb, model_b(xb, training=True))
        grads = tape.gradient(loss, model_b.trainable_variables)
        opt.apply_gradients(zip(grads, model_b.trainable_variables))

    for _ in range(2):
        for i in range(0, len(x), 32):
            opt.on_step_begin()
            step(x[i:i + 32], y[i:i + 32])
    for wa, wb in zip(model_a.get_weights(), model_b.get_weights()):
        np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)


def test_save_load_and_continue(tmp_path):
    """A saved model + optimizer loads back and continues exactly like the original."""
    x, y = toy_data()
    model = compiled(make_opt(base="adam", learning_rate=0.01), batch_norm=True)
    model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0,
              callbacks=[CurvatureRefresh(batch=(x[:64], y[:64]))])
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = tf.keras.models.load_model(path)
    assert isinstance(loaded.optimizer, DHO2)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    loaded.optimizer._comm = LocalComm()
    for va, vb in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(va.numpy(), vb.numpy())
    for m in (model, loaded):
        m.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0,
              callbacks=[CurvatureRefresh(batch=(x[:64], y[:64]))])
    assert int(loaded.optimizer.state.refreshes.numpy()) == 4   # 32 steps, W=4, T=8
    for wa, wb in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)


def test_checkpoint_carries_curvature_state(tmp_path):
    x, y = toy_data()
    model = compiled(make_opt())
    model.fit(x, y, batch_size=32, epochs=1, verbose=0,
              callbacks=[CurvatureRefresh(batch=(x[:64], y[:64]))])
    ckpt = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
    path = ckpt.write(str(tmp_path / "ckpt"))
    model2 = compiled(make_opt())
    model2.optimizer.build(model2.trainable_variables)
    tf.train.Checkpoint(model=model2, optimizer=model2.optimizer).read(path).assert_consumed()
    np.testing.assert_array_equal(model.optimizer.state.eigenvectors.numpy(),
                                  model2.optimizer.state.eigenvectors.numpy())
    assert int(model2.optimizer.state.refreshes.numpy()) == int(model.optimizer.state.refreshes.numpy())


def test_every_hyperparameter_is_a_read_only_property_with_the_value_in_use():
    """The explicit properties cover every Hyperparameters field (a new field without one
    would be invisible on the optimizer), read the resolved value and refuse assignment."""
    import dataclasses

    from dho2_tf.hyperparameters import Hyperparameters

    opt = DHO2(learning_rate=0.1, k=3, ell=1, refresh_every=17, seed=5, comm=LocalComm())
    for name in [f.name for f in dataclasses.fields(Hyperparameters)] + ["num_pairs"]:
        assert isinstance(getattr(DHO2, name, None), property), name
        assert getattr(opt, name) == getattr(opt.hp, name), name
        with pytest.raises(AttributeError):
            setattr(opt, name, object())
    assert (opt.k, opt.ell, opt.num_pairs, opt.refresh_every, opt.seed) == (3, 1, 4, 17, 5)


@pytest.mark.parametrize("learning_rate", [
    0.01, tf.keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=10, decay_rate=0.5)])
def test_get_config_round_trip(learning_rate):
    opt = DHO2(learning_rate=learning_rate, base="nesterov", k=4, ell=1, alpha=0.2, c_max=2.0,
               lanczos_order=30, refresh_every=50, warmup=10, eigenvalue_damping=1e-3,
               seed=7, clipnorm=1.0)
    config = opt.get_config()
    again = DHO2.from_config(dict(config))
    assert again.get_config() == config
    revived = tf.keras.optimizers.deserialize(tf.keras.optimizers.serialize(opt))
    assert isinstance(revived, DHO2) and revived.get_config() == config


def test_learning_rate_schedule_is_used():
    # lr 0.1 while step <= 1, then 0.
    schedule = tf.keras.optimizers.schedules.PiecewiseConstantDecay([1], [0.1, 0.0])
    x, y = toy_data(n=64)
    model = compiled(make_opt(learning_rate=schedule, base="sgd", refresh_every=100))
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)  # steps 0, 1: lr 0.1
    before = [w.copy() for w in model.get_weights()]
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)  # steps 2, 3: lr 0
    for wa, wb in zip(before, model.get_weights()):
        np.testing.assert_array_equal(wa, wb)


def test_hvp_leaves_batch_norm_statistics_unchanged():
    x, y = toy_data()
    model = compiled(make_opt(), batch_norm=True)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    stats = [v.numpy().copy() for v in model.non_trainable_variables]
    model.optimizer.bind(model, None, (x[:64], y[:64]))
    model.optimizer.refresh_curvature()
    for before, var in zip(stats, model.non_trainable_variables):
        np.testing.assert_array_equal(before, var.numpy())


@pytest.mark.parametrize("kwargs,message", [
    (dict(k=0), "`k` must be a positive integer. Received: k=0"),
    (dict(ell=-1), "`ell` must be a non-negative integer. Received: ell=-1"),
    (dict(alpha=-0.5), "`alpha` must be a finite number in [0.0, inf). Received: alpha=-0.5"),
    (dict(base="rmsprop"), "`base` must be one of ('sgd', 'momentum', 'nesterov', 'adam'). "
                           "Received: base='rmsprop'"),
    (dict(k=5, ell=2, lanczos_order=6), "`lanczos_order` must be an integer >= 7 (it must be "
                                        "at least k + ell). Received: lanczos_order=6"),
    (dict(refresh_every=0),
     "`refresh_every` must be a positive integer. Received: refresh_every=0"),
    (dict(warmup=-1), "`warmup` must be a non-negative integer. Received: warmup=-1"),
    (dict(c_max=0.5), "`c_max` must be a finite number in [1.0, inf). Received: c_max=0.5"),
    (dict(mode="ring"), "`mode` must be one of"),
    (dict(weight_decay=1e-4), "`weight_decay` is not supported by DHO2"),
    (dict(learning_rate=-0.1), "`learning_rate` must be a finite number in [0.0, inf). "
                               "Received: learning_rate=-0.1"),
    (dict(learning_rate="fast"), "`learning_rate` must be a finite number"),
])
def test_invalid_hyper_parameters_name_the_parameter(kwargs, message):
    with pytest.raises(ValueError) as err:
        DHO2(**kwargs)
    assert message in str(err.value)


def test_refresh_before_bind_says_what_to_call():
    model = toy_model()
    opt = make_opt()
    opt.build(model.trainable_variables)
    with pytest.raises(RuntimeError, match=r"call optimizer.bind\(model, loss, \(x, y\)\) first"):
        opt.refresh_curvature()


def test_public_api_exports():
    assert dho2_tf.DHO2 is DHO2 and dho2_tf.CurvatureRefresh is CurvatureRefresh
    assert dho2_tf.training_loop is training_loop


# ----------------------------------------------------------------- the custom-loop driver
def loop_step(model, opt):
    return train_step(model, opt, LOSS)


def test_training_loop_equals_fit():
    """training_loop drives the same refreshes and steps as fit with CurvatureRefresh."""
    x, y = toy_data()
    model_a = compiled(make_opt())
    cb = CurvatureRefresh(batch=(x[:64], y[:64]))
    model_a.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0, callbacks=[cb])
    model_b, opt = toy_model(), make_opt()
    step = loop_step(model_b, opt)
    with training_loop(opt, model_b, LOSS, (x[:64], y[:64])) as loop:
        for _ in range(2):
            for i in range(0, len(x), 32):
                loop.step(step, x[i:i + 32], y[i:i + 32])
    assert loop.iterations == 16 and opt.refresh_index() == len(cb.refreshes) == 2
    for wa, wb in zip(model_a.get_weights(), model_b.get_weights()):
        np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)


def test_training_loop_admm_runs_every_round_and_ends_on_z():
    x, y = toy_data()
    model, opt = toy_model(), make_opt(mode="admm", tau=3)
    step = loop_step(model, opt)
    with training_loop(opt, model, LOSS, (x[:64], y[:64])) as loop:
        for i in range(0, 320, 32):       # 10 steps (x repeats after 256)
            loop.step(step, x[i % 256:i % 256 + 32], y[i % 256:i % 256 + 32])
    assert opt.curvature_metrics()["admm_rounds"] == 3          # after steps 3, 6, 9
    np.testing.assert_array_equal(                              # on_train_end: the model holds z
        np.concatenate([w.ravel() for w in model.get_weights()]),
        opt.distribution.z.numpy())


def test_bound_loop_without_on_step_begin_fails_when_a_refresh_is_due():
    x, y = toy_data()
    model, opt = toy_model(), make_opt()                        # W = 4: refresh before update 3
    opt.bind(model, LOSS, (x[:64], y[:64]))
    step = loop_step(model, opt)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"on_step_begin\(\) was not called"):
        for i in range(0, 256, 32):
            step(x[i:i + 32], y[i:i + 32])
    assert int(opt.iterations.numpy()) == 3 and opt.refresh_index() == 0


def test_adaptive_schedule_that_stretches_is_no_missed_refresh():
    """A hand-wired loop that calls every hook, on an adaptive schedule that never finds the
    pairs stale: the checks of later intervals stretch them (no refresh), which is no error;
    skipping on_step_begin before the first refresh still is."""
    x, y = toy_data()
    model = toy_model()
    opt = make_opt(max_refresh_every=40, staleness_tol=1e9)     # W = 4, T = 8
    opt.bind(model, LOSS, (x[:64], y[:64]))
    step = loop_step(model, opt)
    for t in range(20):
        opt.on_step_begin()
        step(x[:32], y[:32])
        opt.on_step_end()
    assert opt.refresh_index() == 1                             # the first, then stretched
    model, opt = toy_model(), make_opt(max_refresh_every=40)
    opt.bind(model, LOSS, (x[:64], y[:64]))
    step = loop_step(model, opt)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"on_step_begin\(\) was not called"):
        for _ in range(8):
            step(x[:32], y[:32])
    assert int(opt.iterations.numpy()) == 3


def test_admm_loop_without_on_step_end_fails_after_tau_steps():
    x, y = toy_data()
    model, opt = toy_model(), make_opt(mode="admm", tau=2, warmup=100, refresh_every=100)
    opt.bind(model, LOSS, (x[:64], y[:64]))
    step = loop_step(model, opt)
    with pytest.raises(tf.errors.InvalidArgumentError, match="without a consensus round"):
        for i in range(0, 256, 32):
            opt.on_step_begin()
            step(x[i:i + 32], y[i:i + 32])
    assert int(opt.iterations.numpy()) == 2                     # updates 0 and 1 ran


def test_misuse_of_the_loop_object():
    x, y = toy_data()
    model, opt = toy_model(), make_opt()
    loop = training_loop(opt, model, LOSS, (x[:64], y[:64]))
    with pytest.raises(RuntimeError, match="inside `with dho2_tf.training_loop"):
        loop.step(lambda: None)
    with pytest.raises(TypeError, match="drives a dho2_tf.DHO2 optimizer"):
        training_loop(tf.keras.optimizers.SGD(0.1), model, LOSS, (x[:64], y[:64]))


# ----------------------------------------------------------------- bad curvature input
@pytest.mark.parametrize("where", ["x", "y"])
def test_nonfinite_curvature_rows_are_refused_with_their_indices(where):
    x, y = toy_data()
    xb, yb = x[:64].copy(), y[:64].astype("float32")
    if where == "x":
        xb[3, 0], xb[17, 5] = np.nan, np.inf
    else:
        yb[3], yb[17] = np.nan, -np.inf
    message = r"NaN/Inf in 2 row\(s\): 3, 17\."
    with pytest.raises(ValueError, match=message):
        make_opt().bind(toy_model(), LOSS, (xb, yb))
    model = compiled(make_opt())
    with pytest.raises(ValueError, match=message):
        model.fit(x, y, batch_size=32, epochs=1, verbose=0,
                  callbacks=[CurvatureRefresh(batch=(xb, yb))])
    assert int(model.optimizer.iterations.numpy()) == 0         # refused before training
    with pytest.raises(ValueError, match=message):
        with training_loop(make_opt(), toy_model(), LOSS, (xb, yb)):
            pass


@pytest.fixture
def mixed_precision():
    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")


def test_mixed_precision_fails_naming_it_and_the_alternative(mixed_precision):
    x, y = toy_data()
    model = compiled(make_opt())                  # Keras wraps DHO2 in a LossScaleOptimizer
    with pytest.raises(ValueError) as fit_error:
        model.fit(x, y, batch_size=32, epochs=1, verbose=0,
                  callbacks=[CurvatureRefresh(batch=(x[:64], y[:64]))])
    with pytest.raises(ValueError) as bind_error:
        make_opt().bind(toy_model(), LOSS, (x[:64], y[:64]))
    for err in (fit_error, bind_error):
        text = str(err.value)
        assert "DHO2 does not support mixed precision" in text and "mixed_float16" in text
        assert "set_global_policy('float32')" in text and "base optimizer" in text


def test_progress_bar_is_turned_off_on_other_ranks():
    x, y = toy_data()
    for rank, expected in ((0, 1), (1, 0)):
        comm = LocalComm()
        comm.rank = rank
        model = compiled(make_opt(comm=comm))
        cb = CurvatureRefresh(batch=(x[:64], y[:64]))
        cb.set_model(model)
        params = {"verbose": 1, "epochs": 1, "steps": 8}
        cb.set_params(params)
        assert params["verbose"] == expected
