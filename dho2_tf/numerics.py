"""Python scalars as exact tensors of the model's dtype.

``tf.cast(0.1, tf.float64)`` first makes a float32 tensor of the Python float and then widens
it, giving 0.10000000149...: in a float64 run every hyper-parameter (α, β, ε, ρ, σ_d, ...) would
be rounded to float32. :func:`scalar` converts a Python number directly to the target dtype.
"""

from __future__ import annotations

import numbers
from typing import Any

import tensorflow as tf


def scalar(value: Any, dtype: tf.DType) -> tf.Tensor:
    """``value`` as a ``dtype`` tensor: a Python number exactly, a tensor by ``tf.cast``."""
    if isinstance(value, numbers.Number) and not isinstance(value, bool):
        return tf.constant(value, dtype)
    return tf.cast(value, dtype)
