"""Small models and data shared by the prioritized-SGD unit tests."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

SCCE = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def classification_data(n: int = 200, d: int = 8, classes: int = 3, seed: int = 0
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian inputs with labels from a random linear map."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = np.argmax(x @ rng.normal(size=(d, classes)), axis=1).astype(np.int32)
    return x, y


def mlp(d: int = 8, classes: int = 3, hidden: int = 16, seed: int = 0) -> tf.keras.Model:
    """A two-layer tanh MLP with logits output."""
    tf.keras.utils.set_random_seed(seed)
    return tf.keras.Sequential([tf.keras.Input((d,)),
                                tf.keras.layers.Dense(hidden, activation="tanh"),
                                tf.keras.layers.Dense(classes)])


def cnn(length: int = 16, classes: int = 3, seed: int = 0) -> tf.keras.Model:
    """A small 1-D CNN (weight-shared layers, so only the exact scorer applies)."""
    tf.keras.utils.set_random_seed(seed)
    return tf.keras.Sequential([tf.keras.Input((length,)),
                                tf.keras.layers.Reshape((length, 1)),
                                tf.keras.layers.Conv1D(4, 3, activation="relu"),
                                tf.keras.layers.MaxPool1D(2),
                                tf.keras.layers.Flatten(),
                                tf.keras.layers.Dense(classes)])


def loop_gradients(model: tf.keras.Model, loss_fn, x: np.ndarray, y: np.ndarray
                   ) -> list[np.ndarray]:
    """Reference per-example gradients: one GradientTape per example, stacked."""
    per_var: list[list[np.ndarray]] = [[] for _ in model.trainable_variables]
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(loss_fn(y[i:i + 1], model(x[i:i + 1], training=False)))
        for j, g in enumerate(tape.gradient(loss, model.trainable_variables)):
            per_var[j].append(g.numpy())
    return [np.stack(g) for g in per_var]


def flat_gradients(grads: list) -> np.ndarray:
    """[B, n_params] from a list of per-variable [B, ...] gradients."""
    return np.concatenate([np.reshape(np.asarray(g), (np.shape(g)[0], -1)) for g in grads], 1)
