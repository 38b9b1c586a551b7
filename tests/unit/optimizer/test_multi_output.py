"""Multi-output models: the curvature is that of the loss Keras minimises (loss weights
included), and the labels of a multi-output curvature batch are accepted as a tuple."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from dho2_tf import DHO2, CurvatureRefresh, LocalComm
from dho2_tf.callbacks import first_batch
from dho2_tf.flat import FlatSpec


def two_output_data(n=64, d=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype("float32")
    y1 = np.sin(x[:, :1]).astype("float32")
    y2 = np.stack([x[:, 1] * x[:, 2], np.cos(x[:, 0])], axis=1).astype("float32")
    return x, y1, y2


def two_output_model(d=3, seed=0):
    tf.keras.utils.set_random_seed(seed)
    inp = tf.keras.Input((d,))
    hidden = tf.keras.layers.Dense(3, activation="tanh")(inp)
    out1 = tf.keras.layers.Dense(1, name="first")(hidden)
    out2 = tf.keras.layers.Dense(2, name="second")(hidden)
    return tf.keras.Model(inp, [out1, out2])


def weighted_loss(model, x, y1, y2, w1, w2):
    """w₁·mean((y₁ − ŷ₁)²) + w₂·mean((y₂ − ŷ₂)²), written out by hand."""
    p1, p2 = model(x, training=True)
    return w1 * tf.reduce_mean(tf.square(y1 - p1)) + w2 * tf.reduce_mean(tf.square(y2 - p2))


def explicit_hessian(model, loss_fn):
    variables = model.trainable_variables
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            loss = loss_fn()
        flat = tf.concat([tf.reshape(g, [-1]) for g in inner.gradient(loss, variables)], 0)
    rows = outer.jacobian(flat, variables, experimental_use_pfor=False)
    return tf.concat([tf.reshape(r, [flat.shape[0], -1]) for r in rows], 1).numpy()


@pytest.mark.parametrize("loss, loss_weights, w1, w2", [
    ("mse", None, 1.0, 1.0),                      # one loss for both outputs: their sum
    (["mse", "mse"], [1.0, 0.25], 1.0, 0.25),
    ({"first": "mse", "second": "mse"}, {"first": 2.0, "second": 0.5}, 2.0, 0.5),
])
def test_curvature_is_that_of_the_compiled_loss(loss, loss_weights, w1, w2):
    x, y1, y2 = two_output_data()
    model = two_output_model()
    n = FlatSpec.of(model.trainable_variables).n
    # Lanczos of order n at every refresh gives the exact extreme eigenvalues.
    opt = DHO2(learning_rate=0.01, base="sgd", k=3, lanczos_order=n, refresh_every=4,
               warmup=1, refresh_method="lanczos", comm=LocalComm())
    model.compile(optimizer=opt, loss=loss, loss_weights=loss_weights)
    cb = CurvatureRefresh(batch=(x[:32], (y1[:32], y2[:32])))
    model.fit(x, (y1, y2), batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[cb])
    assert len(cb.refreshes) == 1 and cb.refreshes[0]["installed"]

    # Keras minimises exactly the hand-written weighted sum ...
    keras_loss = model.evaluate(x[:32], (y1[:32], y2[:32]), batch_size=32, verbose=0)[0]
    ours = float(weighted_loss(model, x[:32], y1[:32], y2[:32], w1, w2))
    np.testing.assert_allclose(keras_loss, ours, rtol=1e-5)
    # ... and DHO2's Hessian-vector product and eigenvalues are those of that sum.
    h = explicit_hessian(model, lambda: weighted_loss(model, x[:32], y1[:32], y2[:32], w1, w2))
    hvp = opt.binding["hvp"]
    columns = np.stack([hvp(tf.one_hot(i, n)).numpy() for i in range(n)], axis=1)
    np.testing.assert_allclose(columns, h, rtol=1e-4, atol=1e-5)
    info = opt.refresh_curvature()
    expected = np.sort(np.linalg.eigvalsh(h))[::-1][:3]
    np.testing.assert_allclose(np.sort(info["eigenvalues"])[::-1], expected, rtol=1e-3,
                               atol=1e-5)


def test_tuple_labels_accepted_and_mismatched_rows_named():
    x, y1, y2 = two_output_data()
    bx, by = first_batch((x[:32], (y1[:32], y2[:32])))
    assert len(bx) == 32 and len(by) == 2
    with pytest.raises(ValueError, match=r"same number of rows.*\[32, 31\]"):
        first_batch((x[:32], (y1[:32], y2[:31])))
    with pytest.raises(ValueError, match="empty"):
        first_batch((x[:0], (y1[:0], y2[:0])))


def test_label_parts_must_match_outputs():
    x, y1, y2 = two_output_data()
    model = two_output_model()
    model.compile(optimizer=DHO2(k=2, comm=LocalComm()), loss="mse")
    with pytest.raises(ValueError, match="3 part.*2 output"):
        model.optimizer.bind(model, None, (x[:16], (y1[:16], y2[:16], y2[:16])))


def test_per_output_loss_structure_passed_explicitly_is_refused():
    x, y1, y2 = two_output_data()
    model = two_output_model()
    model.compile(optimizer=DHO2(k=2, comm=LocalComm()), loss="mse")
    with pytest.raises(ValueError, match="compile the model with them and pass loss=None"):
        model.optimizer.bind(model, ["mse", "mse"], (x[:16], (y1[:16], y2[:16])))
