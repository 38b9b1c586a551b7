"""Integer-input models: an Embedding model trains with DHO2 and its curvature is exact."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from dho2_tf import DHO2, CurvatureRefresh, LocalComm
from dho2_tf.curvature import make_hvp_fn
from dho2_tf.curvature.hvp import HVP_METHODS
from dho2_tf.flat import FlatSpec


def embedding_data(n=96, length=3, vocab=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, vocab, (n, length)).astype("int32")
    table = rng.standard_normal(vocab)
    y = table[x].sum(axis=1, keepdims=True).astype("float32")
    return x, y


def embedding_model(length=3, vocab=5, dim=2, seed=0):
    tf.keras.utils.set_random_seed(seed)
    return tf.keras.Sequential([tf.keras.Input((length,), dtype="int32"),
                                tf.keras.layers.Embedding(vocab, dim),
                                tf.keras.layers.Flatten(),
                                tf.keras.layers.Dense(3, activation="tanh"),
                                tf.keras.layers.Dense(1)])


def explicit_hessian(model, x, y):
    """H of mean((y − model(x))²) w.r.t. the trainable variables, by nested tapes (dense)."""
    variables = model.trainable_variables
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            loss = tf.reduce_mean(tf.square(y - model(x, training=True)))
        grads = inner.gradient(loss, variables)
        flat = tf.concat([tf.reshape(tf.convert_to_tensor(g), [-1]) for g in grads], 0)
    rows = outer.jacobian(flat, variables, experimental_use_pfor=False)
    return tf.concat([tf.reshape(r, [flat.shape[0], -1]) for r in rows], 1).numpy()


@pytest.mark.parametrize("method", HVP_METHODS)  # forward-over-reverse falls back
def test_embedding_hvp_matches_explicit_hessian(method):
    x, y = embedding_data()
    model = embedding_model()
    hvp = make_hvp_fn(model, tf.keras.losses.MeanSquaredError(), (x[:32], y[:32]),
                      method=method)
    n = FlatSpec.of(model.trainable_variables).n
    columns = np.stack([hvp(tf.one_hot(i, n)).numpy() for i in range(n)], axis=1)
    h = explicit_hessian(model, x[:32], y[:32])
    np.testing.assert_allclose(columns, h, rtol=1e-4, atol=1e-5)


def test_embedding_model_trains_and_eigenvalues_match_explicit_hessian():
    x, y = embedding_data()
    model = embedding_model()
    n = FlatSpec.of(model.trainable_variables).n
    # Lanczos of order n at every refresh: the exact extreme eigenvalues (the warm refresh is an
    # approximation of 2K HVPs, see tests/unit/curvature/test_warm_start.py).
    opt = DHO2(learning_rate=0.02, base="adam", k=3, lanczos_order=n, refresh_every=6,
               warmup=2, alpha=0.05, refresh_method="lanczos", comm=LocalComm())
    model.compile(optimizer=opt, loss="mse")
    loss0 = model.evaluate(x, y, verbose=0)
    cb = CurvatureRefresh(batch=(x[:32], y[:32]))
    model.fit(x, y, batch_size=16, epochs=4, shuffle=False, verbose=0, callbacks=[cb])
    assert model.evaluate(x, y, verbose=0) < 0.7 * loss0
    assert len(cb.refreshes) == 4 and all(r["installed"] for r in cb.refreshes)
    info = opt.refresh_curvature()                  # at the final weights
    expected = np.sort(np.linalg.eigvalsh(explicit_hessian(model, x[:32], y[:32])))[::-1][:3]
    np.testing.assert_allclose(np.sort(info["eigenvalues"])[::-1], expected, rtol=1e-3,
                               atol=1e-5)
