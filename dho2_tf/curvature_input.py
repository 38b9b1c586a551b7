"""Checks of what a curvature refresh is given, before anything is compiled: a curvature batch
whose every row is finite, and a model that computes in full precision."""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

#: Compute dtypes of Keras' mixed-precision policies (``mixed_float16``, ``mixed_bfloat16``).
HALF_DTYPES = ("float16", "bfloat16")


def mixed_precision_message(found: str) -> str:
    """Why DHO2 refuses a mixed-precision model, and what to do instead."""
    return (f"DHO2 does not support mixed precision: {found}. Its Hessian-vector products and "
            "Lanczos iteration need float32 (in float16 they overflow or lose the small "
            "eigenvalues). Build the model under tf.keras.mixed_precision.set_global_policy("
            "'float32') to train it with DHO2, or keep mixed precision and train with the base "
            "optimizer alone (e.g. tf.keras.optimizers.SGD(learning_rate, momentum=0.9)).")


def check_full_precision(model: tf.keras.Model) -> None:
    """ValueError when a layer of ``model`` computes in float16/bfloat16 (mixed precision)."""
    half = sorted({layer.name for layer in [model, *model.submodules]
                   if isinstance(layer, tf.keras.layers.Layer)
                   and getattr(layer, "compute_dtype", None) in HALF_DTYPES})
    if half:
        policy = tf.keras.mixed_precision.global_policy().name
        raise ValueError(mixed_precision_message(
            f"layers {half[:5]} of the model compute in half precision (global Keras policy "
            f"{policy!r})"))


def nonfinite_rows(batch: Any) -> list[int]:
    """Indices of the rows of ``batch`` (nested arrays/tensors with a common first dimension)
    holding NaN or ±Inf in any floating-point leaf, sorted."""
    bad: set[int] = set()
    for leaf in tf.nest.flatten(batch):
        values = np.asarray(leaf)
        if values.ndim == 0 or not np.issubdtype(values.dtype, np.floating):
            continue
        finite = np.isfinite(values.reshape(len(values), -1)).all(axis=1)
        bad.update(np.flatnonzero(~finite).tolist())
    return sorted(bad)


def check_curvature_batch(batch: Any) -> None:
    """ValueError naming the rows of the curvature batch that hold NaN/Inf.

    Such a row makes every Hessian-vector product non-finite, so every refresh would fail and
    DHO2 would silently train as its base optimizer; the caller drops the rows instead.
    """
    bad = nonfinite_rows(batch)
    if bad:
        shown = ", ".join(map(str, bad[:20])) + (", ..." if len(bad) > 20 else "")
        raise ValueError(
            f"The curvature batch holds NaN/Inf in {len(bad)} row(s): {shown}. Every curvature "
            "refresh on it would fail. Drop those rows (e.g. keep = np.isfinite(x).all(axis=1)"
            " & np.isfinite(y); batch=(x[keep], y[keep])) or pass another batch.")


def check_curvature_input(model: tf.keras.Model, batch: Any) -> None:
    """What ``DHO2.bind`` checks: ValueError when a row of ``batch`` holds NaN/Inf
    (:func:`check_curvature_batch`) or the model computes in half precision
    (:func:`check_full_precision`)."""
    check_curvature_batch(batch)
    check_full_precision(model)
