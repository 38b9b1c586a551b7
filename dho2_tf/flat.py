"""Flat parameter-space vectors: one fixed order of variables, concatenated and reshaped.

θ ∈ ℝⁿ is ``concat([reshape(v, [-1]) for v in variables])`` in the given variable order
(``model.trainable_variables`` order). Optimizer state, gradients and eigenvectors all use this
order, so one split of a flat displacement updates every variable in place.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class FlatSpec:
    """Shapes of a list of tensors and their position in the flat vector.

    Attributes:
        shapes: static shape of each tensor.
        sizes: number of elements of each tensor.
        n: total number of elements.
    """

    shapes: tuple[tuple[int, ...], ...]
    sizes: tuple[int, ...]
    n: int

    @classmethod
    def of(cls, tensors: Sequence[tf.Tensor | tf.Variable]) -> "FlatSpec":
        """Spec of ``tensors`` (all shapes must be fully defined)."""
        shapes = []
        for t in tensors:
            shape = tf.TensorShape(t.shape)
            if not shape.is_fully_defined():
                raise ValueError(f"Every tensor needs a fully defined shape. Received: {shape}")
            shapes.append(tuple(int(d) for d in shape))
        sizes = tuple(int(np.prod(s, dtype=np.int64)) for s in shapes)
        return cls(tuple(shapes), sizes, int(sum(sizes)))


def flatten(tensors: Sequence[tf.Tensor | tf.Variable | None], spec: FlatSpec | None = None,
            dtype: tf.DType | None = None) -> tf.Tensor:
    """Concatenate ``tensors`` into one vector ``[n]``; ``None`` entries count as zeros.

    Args:
        tensors: tensors in flat order. ``tf.IndexedSlices`` are densified.
        spec: needed only when some entries are ``None`` (to know their size).
        dtype: cast every piece to this dtype (default: keep).
    """
    parts = []
    for i, t in enumerate(tensors):
        if t is None:
            if spec is None:
                raise ValueError("`spec` is required when a tensor is None.")
            parts.append(tf.zeros([spec.sizes[i]], dtype or tf.float32))
            continue
        if isinstance(t, tf.IndexedSlices):
            t = tf.convert_to_tensor(t)
        t = tf.reshape(t, [-1])
        parts.append(t if dtype is None else tf.cast(t, dtype))
    return tf.concat(parts, axis=0)


def unflatten(flat: tf.Tensor, spec: FlatSpec) -> list[tf.Tensor]:
    """Split ``flat`` ``[n]`` back into tensors of ``spec.shapes``."""
    pieces = tf.split(flat, list(spec.sizes), axis=0)
    return [tf.reshape(p, s) for p, s in zip(pieces, spec.shapes)]


def assign_add_flat(variables: Sequence[tf.Variable], delta: tf.Tensor, spec: FlatSpec) -> None:
    """θ ← θ + δ, one ``assign_add`` per variable: v_i ← v_i + reshape(δ[o_i : o_i + n_i]).

    Cheaper than writing θ + δ back into every variable: the weights are never flattened and
    each variable is updated in place.
    """
    for var, piece in zip(variables, unflatten(delta, spec)):
        var.assign_add(piece)
