"""The custom-loop training step the unit tests share."""

from __future__ import annotations

from typing import Any, Callable

import tensorflow as tf


def train_step(model: tf.keras.Model, opt: Any, loss: Callable) -> Callable:
    """A ``tf.function`` ``step(xb, yb) -> loss`` that applies one ``opt`` update to ``model``."""
    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            value = loss(yb, model(xb, training=True))
        opt.apply_gradients(zip(tape.gradient(value, model.trainable_variables),
                                model.trainable_variables))
        return value

    return step
