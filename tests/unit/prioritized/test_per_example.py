"""Vectorised per-example gradients and scorers (docs/algorithm.md §9.7, §9.9 property 1)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from dho2_tf.prioritized import per_example
from tests.helpers import prioritized as helpers

RTOL = 1e-5  # float32


@pytest.mark.parametrize("build, shape", [(helpers.mlp, (8,)), (helpers.cnn, (16,))])
def test_vectorised_gradients_equal_per_example_tapes(build, shape):
    model = build()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(12, *shape)).astype(np.float32)
    y = rng.integers(0, 3, size=12).astype(np.int32)
    loss_fn = per_example.per_example_loss_fn(helpers.SCCE)
    grads, losses = per_example.per_example_gradients(model, loss_fn, x, y)
    expected = helpers.loop_gradients(model, loss_fn, x, y)
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(losses.numpy(), loss_fn(y, model(x)).numpy(), rtol=RTOL)


def test_exact_scorer_length_projection_and_masked_sum():
    model = helpers.mlp()
    x, y = helpers.classification_data(10)
    loss_fn = per_example.per_example_loss_fn(helpers.SCCE)
    g = helpers.flat_gradients(helpers.loop_gradients(model, loss_fn, x, y))
    gbar_flat = np.random.default_rng(2).normal(size=g.shape[1]).astype(np.float32)
    spec_sizes = [int(np.prod(v.shape)) for v in model.trainable_variables]
    gbar = [tf.reshape(p, v.shape) for p, v in
            zip(tf.split(gbar_flat, spec_sizes), model.trainable_variables)]
    mask = np.array([1, 0] * 5, np.float32)
    scores = per_example.ExactScorer(model, loss_fn)(x, y, gbar, mask)
    np.testing.assert_allclose(scores.length.numpy(), np.sum(g * g, 1), rtol=RTOL)
    np.testing.assert_allclose(scores.projection.numpy(), g @ gbar_flat, rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(helpers.flat_gradients([s[None] for s in scores.grad_sum])[0],
                               mask @ g, rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("activation", [None, "sigmoid"])
def test_last_layer_closed_form_equals_exact_last_layer_gradients(activation):
    tf.keras.utils.set_random_seed(3)
    model = tf.keras.Sequential([tf.keras.Input((8,)), tf.keras.layers.Dense(6, "relu"),
                                 tf.keras.layers.Dense(3, activation=activation)])
    x, _ = helpers.classification_data(10)
    y = np.random.default_rng(4).normal(size=(10, 3)).astype(np.float32)
    loss_fn = per_example.per_example_loss_fn("mse")
    scorer = per_example.LastLayerScorer(model, loss_fn)
    grads, _ = per_example.per_example_gradients(model, loss_fn, x, y, scorer.variables)
    g = helpers.flat_gradients(grads)
    gbar = [tf.random.normal(v.shape, seed=5) for v in scorer.variables]
    gbar_flat = np.concatenate([np.ravel(t) for t in gbar])
    scores = scorer(x, y, gbar)
    np.testing.assert_allclose(scores.length.numpy(), np.sum(g * g, 1), rtol=RTOL)
    np.testing.assert_allclose(scores.projection.numpy(), g @ gbar_flat, rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(helpers.flat_gradients([s[None] for s in scores.grad_sum])[0],
                               g.sum(0), rtol=RTOL, atol=1e-6)


def test_last_layer_scorer_rejects_non_dense_last_layer():
    model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(3),
                                 tf.keras.layers.Softmax()])
    with pytest.raises(ValueError, match="last layer is Dense. Received: last layer Softmax"):
        per_example.LastLayerScorer(model, per_example.per_example_loss_fn("mse"))


def test_loss_scorer_has_no_parameter_space():
    model = helpers.mlp()
    x, y = helpers.classification_data(5)
    loss_fn = per_example.per_example_loss_fn("sparse_categorical_crossentropy")
    scores = per_example.make_scorer("exact", model, loss_fn, needs_gradients=False)(x, y, [])
    assert scores.grad_sum == []
    np.testing.assert_allclose(scores.loss.numpy(), loss_fn(y, model(x)).numpy())


def test_per_example_loss_fn_keeps_loss_options_and_rejects_multi_output():
    loss_fn = per_example.per_example_loss_fn(helpers.SCCE)
    logits = tf.constant([[2.0, 0.0, 0.0]])
    np.testing.assert_allclose(loss_fn(tf.constant([0]), logits).numpy(),
                               helpers.SCCE(tf.constant([0]), logits).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="single Keras loss"):
        per_example.per_example_loss_fn({"out": "mse"})


def test_make_scorer_rejects_unknown_kind():
    with pytest.raises(ValueError,
                       match=r"`per_example` must be one of \('exact', 'last_layer', 'auto'\)"):
        per_example.make_scorer("jacobian", helpers.mlp(), per_example.per_example_loss_fn("mse"),
                                needs_gradients=True)
