"""A Keras model whose loss is an explicit quadratic f(θ) = ½θᵀAθ − bᵀθ (test fixture)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf


class QuadraticLayer(tf.keras.layers.Layer):
    """Holds θ and outputs f(θ) = ½θᵀAθ − bᵀθ for every input row (the input is ignored)."""

    def __init__(self, a: np.ndarray, b: np.ndarray, theta0: np.ndarray, dtype: str = "float64"):
        super().__init__(dtype=dtype)
        self.a = tf.constant(a, dtype)
        self.b = tf.constant(b, dtype)
        self.theta0 = theta0

    def build(self, input_shape):
        self.theta = self.add_weight(
            name="theta", shape=self.theta0.shape, dtype=self.dtype,
            initializer=tf.keras.initializers.Constant(self.theta0))

    def call(self, x):
        th = self.theta
        value = 0.5 * tf.tensordot(th, tf.linalg.matvec(self.a, th), 1) - tf.tensordot(
            self.b, th, 1)
        return tf.zeros_like(x[:, :1]) + value


def quadratic_model(a, b, theta0, dtype="float64"):
    """(model, loss_fn, batch) for the quadratic: loss_fn(y, p) = mean(p) = f(θ)."""
    inputs = tf.keras.Input((1,), dtype=dtype)
    model = tf.keras.Model(inputs, QuadraticLayer(a, b, theta0, dtype)(inputs))
    x = np.zeros((2, 1), dtype)
    y = np.zeros((2, 1), dtype)

    def loss_fn(y_true, y_pred):
        return tf.reduce_mean(y_pred)

    return model, loss_fn, (x, y)


def random_spd(n: int, eigenvalues: np.ndarray, seed: int) -> np.ndarray:
    """A = U diag(eigenvalues) Uᵀ with a random orthogonal U."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (q * eigenvalues) @ q.T
