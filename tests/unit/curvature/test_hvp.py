"""T1 (HVP part): both HVP formulations against analytic Hessians, each other and the eager
double-backward reference."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from dho2_tf.curvature import hvp_double_backward, make_hvp_fn
from dho2_tf.curvature.hvp import HVP_METHODS

N, D = 64, 7
methods = pytest.mark.parametrize("method", HVP_METHODS)


def _rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, D))
    y = x @ rng.standard_normal((D, 1)) + 0.1 * rng.standard_normal((N, 1))
    return x, y


def _half_mse(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    return 0.5 * tf.reduce_mean(tf.square(y_pred - y_true))


def _quadratic_model(dtype: str, l2: float = 0.0) -> tf.keras.Model:
    """Dense(1, no bias): ½ mean (xθ − y)² + l2‖θ‖² = ½θᵀAθ − bᵀθ + c, A = XᵀX/N + 2·l2·I."""
    reg = tf.keras.regularizers.L2(l2) if l2 else None
    return tf.keras.Sequential([
        tf.keras.Input((D,), dtype=dtype),
        tf.keras.layers.Dense(1, use_bias=False, dtype=dtype, kernel_regularizer=reg)])


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-5)])
@pytest.mark.parametrize("l2", [0.0, 0.25])  # 0.25: exact in float32, as Keras stores it
@methods
def test_t1_quadratic_hvp_equals_analytic_and_double_backward(dtype: str, tol: float,
                                                               l2: float, method: str) -> None:
    x, y = _data()
    model = _quadratic_model(dtype, l2)
    a = x.T @ x / N + 2.0 * l2 * np.eye(D)
    batch = (tf.constant(x, dtype), tf.constant(y, dtype))
    hvp = make_hvp_fn(model, _half_mse, batch, hvp_dtype=tf.as_dtype(dtype), method=method)
    v = np.random.default_rng(1).standard_normal(D)
    hv = hvp(tf.constant(v, dtype)).numpy()
    assert hv.dtype == np.dtype(dtype)
    assert _rel_err(hv, a @ v) < tol
    ref = hvp_double_backward(model, _half_mse, batch, tf.constant(v, dtype)).numpy()
    assert _rel_err(hv, ref) < tol


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-5)])
@methods
def test_t1_logistic_regression_hvp_equals_analytic(dtype: str, tol: float, method: str) -> None:
    x, y_lin = _data(2)
    y = (y_lin > 0).astype(dtype)
    model = tf.keras.Sequential([tf.keras.Input((D,), dtype=dtype),
                                 tf.keras.layers.Dense(1, dtype=dtype)])
    rng = np.random.default_rng(3)
    model.set_weights([rng.standard_normal((D, 1)), rng.standard_normal(1)])
    loss_fn = tf.keras.losses.BinaryCrossentropy(from_logits=True)
    batch = (tf.constant(x, dtype), tf.constant(y, dtype))
    hvp = make_hvp_fn(model, loss_fn, batch, hvp_dtype=tf.as_dtype(dtype), method=method)

    kernel, bias = (w.astype(np.float64) for w in model.get_weights())
    x_aug = np.hstack([x, np.ones((N, 1))])  # flat order: kernel (D), then bias (1)
    p = 1.0 / (1.0 + np.exp(-(x @ kernel + bias)[:, 0]))
    hessian = x_aug.T @ (x_aug * (p * (1 - p))[:, None]) / N
    for seed in range(3):
        v = np.random.default_rng(10 + seed).standard_normal(D + 1)
        hv = hvp(tf.constant(v, dtype)).numpy()
        assert _rel_err(hv, hessian @ v) < tol
        ref = hvp_double_backward(model, loss_fn, batch, tf.constant(v, dtype)).numpy()
        assert _rel_err(hv, ref) < tol


def _mlp(batch_norm: bool) -> tf.keras.Model:
    layers = [tf.keras.layers.Dense(8, activation="tanh")]
    if batch_norm:
        layers.append(tf.keras.layers.BatchNormalization(momentum=0.5))
    layers.append(tf.keras.layers.Dense(1))
    tf.keras.utils.set_random_seed(4)
    model = tf.keras.Sequential(layers)
    model.build((None, D))
    return model


@pytest.mark.parametrize("batch_norm", [False, True])
def test_t1_mlp_forward_over_reverse_equals_reverse_over_reverse(batch_norm: bool) -> None:
    x, y = _data(5)
    model = _mlp(batch_norm=batch_norm)
    batch = (tf.constant(x, tf.float32), tf.constant(y, tf.float32))
    n = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    forward, reverse = (make_hvp_fn(model, _half_mse, batch, method=m)
                        for m in ("forward-over-reverse", "reverse-over-reverse"))
    v = tf.constant(np.random.default_rng(6).standard_normal(n), tf.float32)
    hv, ref = forward(v).numpy(), reverse(v).numpy()
    assert np.linalg.norm(ref) > 1e-3
    assert _rel_err(hv, ref) < 1e-5
    assert _rel_err(ref, hvp_double_backward(model, _half_mse, batch, v).numpy()) < 1e-5


@methods
def test_hvp_is_linear_and_follows_current_weights_without_retracing(method: str) -> None:
    x, y = _data(7)
    model = _mlp(batch_norm=False)
    batch = (tf.constant(x, tf.float32), tf.constant(y, tf.float32))
    n = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    hvp = make_hvp_fn(model, _half_mse, batch, method=method)
    rng = np.random.default_rng(8)
    u, w = (tf.constant(rng.standard_normal(n), tf.float32) for _ in range(2))
    hu, hw, huw = hvp(u).numpy(), hvp(w).numpy(), hvp(2.0 * u - w).numpy()
    assert _rel_err(huw, 2.0 * hu - hw) < 1e-5
    before = hvp(u).numpy()
    model.layers[0].kernel.assign_add(tf.ones_like(model.layers[0].kernel))
    after = hvp(u).numpy()
    assert _rel_err(after, hvp_double_backward(model, _half_mse, batch, u).numpy()) < 1e-5
    assert _rel_err(after, before) > 1e-3
    assert hvp.experimental_get_tracing_count() == 1


@methods
def test_hvp_leaves_batch_norm_moving_statistics_unchanged(method: str) -> None:
    x, y = _data(9)
    model = _mlp(batch_norm=True)
    bn = model.layers[1]
    bn.moving_mean.assign(tf.fill(bn.moving_mean.shape, 0.25))
    bn.moving_variance.assign(tf.fill(bn.moving_variance.shape, 3.0))
    frozen_before = [v.numpy().copy() for v in model.non_trainable_variables]
    assert len(frozen_before) == 2
    batch = (tf.constant(x, tf.float32), tf.constant(y, tf.float32))
    n = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    hvp = make_hvp_fn(model, _half_mse, batch, training=True, method=method)
    v = tf.constant(np.random.default_rng(10).standard_normal(n), tf.float32)
    hv = hvp(v).numpy()
    hvp(v)
    for before, var in zip(frozen_before, model.non_trainable_variables):
        np.testing.assert_array_equal(var.numpy(), before)
    ref = hvp_double_backward(model, _half_mse, batch, v).numpy()
    for before, var in zip(frozen_before, model.non_trainable_variables):
        np.testing.assert_array_equal(var.numpy(), before)
    assert _rel_err(hv, ref) < 1e-5
    model(batch[0], training=True)  # a plain training call does move them: the test can fail
    assert not np.allclose(bn.moving_mean.numpy(), frozen_before[0])


def test_hvp_over_a_subset_of_variables_is_the_hessian_block() -> None:
    x, y = _data(11)
    model = tf.keras.Sequential([tf.keras.Input((D,), dtype="float64"),
                                 tf.keras.layers.Dense(1, dtype="float64")])
    batch = (tf.constant(x), tf.constant(y))
    kernel = model.layers[0].kernel
    hvp = make_hvp_fn(model, _half_mse, batch, hvp_dtype=tf.float64, variables=[kernel])
    v = np.random.default_rng(12).standard_normal(D)
    np.testing.assert_allclose(hvp(tf.constant(v)).numpy(), x.T @ x @ v / N, rtol=1e-10)


def test_hvp_validation_errors() -> None:
    x, y = _data()
    model = _quadratic_model("float32")
    with pytest.raises(ValueError, match=r"`batch` must be a tuple \(x, y\)"):
        make_hvp_fn(model, _half_mse, x)
    with pytest.raises(ValueError, match="`variables` must be a non-empty list"):
        make_hvp_fn(model, _half_mse, (x, y), variables=[])
    with pytest.raises(ValueError, match="`hvp_method` must be one of .*'forward-over-reverse'"
                                         ".*Received: hvp_method='finite-difference'"):
        make_hvp_fn(model, _half_mse, (x, y), method="finite-difference")
