"""Blocks of Hessian-vector products (``block_hvp``) on a model with batch normalisation in
training mode: ``"vectorized"`` against ``"map"`` and an explicit Hessian, and the refusal of a
model whose layers assign variables outside Keras' ``add_update``."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import dho2_tf
from dho2_tf.curvature import make_hvp_fn
from dho2_tf.curvature.block_ops import block_hvp
from dho2_tf.curvature.hvp import HVP_METHODS, layers_assigning_variables

LOSS = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _bn_model(seed: int = 0, renorm: bool = False, dtype: str = "float64") -> tf.keras.Model:
    """Conv1D(2, 3) → BatchNormalization → tanh → Dense(2) (44 parameters)."""
    tf.keras.utils.set_random_seed(seed)
    return tf.keras.Sequential([
        tf.keras.Input((8, 2), dtype=dtype),
        tf.keras.layers.Conv1D(2, 3, dtype=dtype),
        tf.keras.layers.BatchNormalization(dtype=dtype, renorm=renorm, name="bn"),
        tf.keras.layers.Activation("tanh", dtype=dtype),
        tf.keras.layers.Flatten(dtype=dtype),
        tf.keras.layers.Dense(2, dtype=dtype)])


def _data(rows: int = 32, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, 8, 2)) * 2.0 + 0.5, rng.integers(0, 2, rows)


def _n(model: tf.keras.Model) -> int:
    return sum(int(np.prod(v.shape)) for v in model.trainable_variables)


def _statistics(model: tf.keras.Model) -> list[np.ndarray]:
    return [v.numpy().copy() for v in model.non_trainable_variables]


def _explicit_hessian(model: tf.keras.Model, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """H [n, n] of the training-mode loss: the Jacobian of the flat gradient, one reverse pass
    per row (eager), the moving statistics put back afterwards."""
    saved, variables = _statistics(model), model.trainable_variables
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            loss = LOSS(y, model(x, training=True))
        grad = tf.concat([tf.reshape(g, [-1]) for g in inner.gradient(loss, variables)], 0)
    rows = outer.jacobian(grad, variables, experimental_use_pfor=False)
    hessian = np.concatenate([tf.reshape(r, [grad.shape[0], -1]).numpy() for r in rows], 1)
    for var, value in zip(model.non_trainable_variables, saved):
        var.assign(value)
    return 0.5 * (hessian + hessian.T)


def _rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


@pytest.mark.parametrize("method", HVP_METHODS)
def test_vectorized_block_equals_map_block_and_explicit_hessian(method: str) -> None:
    """[H q_j] for 3 random rows: the vectorized block (updates skipped) equals the map block
    (statistics restored) and Q H from an explicit Hessian (float64, relative 1e-10); neither
    moves the moving statistics, which a plain training call does move."""
    model = _bn_model()
    x, y = _data()
    bn = model.get_layer("bn")
    bn.moving_mean.assign([0.3, -0.2])
    bn.moving_variance.assign([2.0, 0.5])
    before = _statistics(model)
    batch = (tf.constant(x), tf.constant(y))
    restoring = make_hvp_fn(model, LOSS, batch, hvp_dtype=tf.float64, method=method)
    skipping = make_hvp_fn(model, LOSS, batch, hvp_dtype=tf.float64, method=method,
                           skip_layer_updates=True)
    assert layers_assigning_variables(restoring, model) == ["bn"]   # the detector can fire
    assert layers_assigning_variables(skipping, model) == []
    q = tf.constant(np.random.default_rng(2).standard_normal((3, _n(model))))
    mapped = tf.function(lambda q: block_hvp(restoring, q, "map"))(q).numpy()
    vectorized = tf.function(lambda q: block_hvp(skipping, q, "vectorized"))(q).numpy()
    for after, value in zip(_statistics(model), before):
        np.testing.assert_array_equal(after, value)
    expected = q.numpy() @ _explicit_hessian(model, x, y)
    assert _rel_err(vectorized, mapped) < 1e-10
    assert _rel_err(vectorized, expected) < 1e-10
    assert _rel_err(mapped, expected) < 1e-10
    model(x, training=True)
    assert not np.allclose(bn.moving_mean.numpy(), before[0])


def _fit(block: str) -> tuple[tf.keras.Model, dho2_tf.DHO2]:
    """8 DHO2 steps (SGD base, K = 2, refresh every 2 steps: one Lanczos and three warm
    refreshes) with ``block_hvp=block`` on the batch-norm model."""
    model = _bn_model(seed=3)
    x, y = _data(64, seed=4)
    opt = dho2_tf.DHO2(0.05, base="sgd", k=2, refresh_every=2, block_hvp=block, seed=0)
    model.compile(opt, LOSS)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[dho2_tf.CurvatureRefresh(batch=(x[:32], y[:32]))])
    return model, opt


def test_dho2_warm_refresh_vectorized_matches_map_on_batch_norm_model() -> None:
    """The same run with either batching: warm refreshes with the same eigenvalues and the
    same final weights and moving statistics (float64, relative 1e-9)."""
    runs = {block: _fit(block) for block in ("map", "vectorized")}
    for _, opt in runs.values():
        assert opt.refresh_index() == 4
        assert opt.last_refresh["method"] == "warm" and opt.last_refresh["installed"]
    (m_map, o_map), (m_vec, o_vec) = runs["map"], runs["vectorized"]
    np.testing.assert_allclose(o_vec.last_refresh["eigenvalues"],
                               o_map.last_refresh["eigenvalues"], rtol=1e-6)
    for a, b in zip(m_vec.variables, m_map.variables):
        assert _rel_err(a.numpy(), b.numpy()) < 1e-9, a.name


class CallCounter(tf.keras.layers.Layer):
    """Identity that counts its calls in a variable it assigns in ``call``."""

    def build(self, input_shape) -> None:
        self.calls = self.add_weight(name="calls", shape=(), dtype=self.dtype,
                                     initializer="zeros", trainable=False)

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        self.calls.assign_add(tf.ones((), self.dtype))
        return inputs


def _counting_model() -> tf.keras.Model:
    tf.keras.utils.set_random_seed(5)
    return tf.keras.Sequential([
        tf.keras.Input((8, 2), dtype="float64"),
        tf.keras.layers.Conv1D(2, 3, dtype="float64"),
        CallCounter(dtype="float64", name="call_counter"),
        tf.keras.layers.Flatten(dtype="float64"),
        tf.keras.layers.Dense(2, dtype="float64")])


@pytest.mark.parametrize("build,layer", [(_counting_model, "call_counter"),
                                         # Keras' renorm runs in float32 only
                                         (lambda: _bn_model(renorm=True, dtype="float32"),
                                          "bn")])
def test_vectorized_is_refused_at_bind_for_layers_assigning_in_call(build, layer: str) -> None:
    """A layer that assigns a variable in its forward pass outside ``add_update`` (a counter;
    batch renormalisation's moving averages) cannot be vectorised: ``bind`` raises a ValueError
    naming ``block_hvp``, the layer and ``"map"``, and binds nothing; ``"map"`` binds it."""
    model = build()
    x, y = (part.astype(model.dtype) if part.dtype.kind == "f" else part for part in _data())
    opt = dho2_tf.DHO2(0.05, base="sgd", k=2, refresh_every=2, block_hvp="vectorized")
    with pytest.raises(ValueError, match=rf"block_hvp='vectorized'.*: {layer}\. Use "
                                         r"block_hvp='map'"):
        opt.bind(model, LOSS, (x, y))
    assert opt.binding is None and opt.refresh_index() == 0
    fallback = dho2_tf.DHO2(0.05, base="sgd", k=2, refresh_every=2, block_hvp="map")
    fallback.bind(model, LOSS, (x, y))
    before = _statistics(model)
    fallback.refresh_curvature()
    assert fallback.last_refresh["installed"]
    for after, value in zip(_statistics(model), before):
        np.testing.assert_array_equal(after, value)
