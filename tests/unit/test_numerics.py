"""Hyper-parameters enter float64 maths exactly, not rounded through float32."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from dho2_tf.numerics import scalar


def test_python_floats_are_exact_in_float64_where_a_cast_rounds_them() -> None:
    for value in (0.1, 0.9, 0.999, 1e-8, 5e-9, 1e-2):
        assert scalar(value, tf.float64).numpy() == value
        assert scalar(value, tf.float32).numpy() == np.float32(value)
    # The reason the helper exists: a cast widens the float32 constant.
    assert tf.cast(0.1, tf.float64).numpy() != 0.1


def test_tensors_and_integers_keep_their_values() -> None:
    x = tf.constant([1.5, -2.0], tf.float32)
    np.testing.assert_array_equal(scalar(x, tf.float64).numpy(), [1.5, -2.0])
    assert scalar(3, tf.float64).numpy() == 3.0 and scalar(3, tf.float64).dtype == tf.float64

    @tf.function
    def traced(v: tf.Tensor) -> tf.Tensor:
        return scalar(v, tf.float64) * scalar(0.1, tf.float64)

    np.testing.assert_array_equal(traced(tf.constant(2.0)).numpy(), 2.0 * 0.1)
