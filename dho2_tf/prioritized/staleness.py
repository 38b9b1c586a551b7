"""Staleness estimators: predict a priority computed at step t_i at the current step t.

Each example keeps (p_i, t_i, a_i). See :class:`dho2_tf.prioritized.PrioritizedSampler` for the
equations (docs/algorithm.md §9.4):

* ``keep``: p̂_i(t) = p_i.
* ``exp-decay`` (the released code's *exp-linear*; aliases ``explinear``, ``exp-linear``):
  p̂_i(t) = p_i·exp(a_i (t − t_i)), with a_i fitted by an EMA of log-ratios on every refresh.

All functions are pure: they take the table tensors and return new ones.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

ESTIMATORS = ("keep", "exp-decay")
_ALIASES = {"keep": "keep", "exp-decay": "exp-decay", "explinear": "exp-decay",
            "exp-linear": "exp-decay", "exp_decay": "exp-decay"}


def canonical_estimator(estimator: str) -> str:
    """``estimator`` with aliases resolved (``"explinear"`` → ``"exp-decay"``).

    Raises:
        ValueError: for an unknown estimator (the message lists the valid names).
    """
    if not isinstance(estimator, str) or estimator.lower() not in _ALIASES:
        raise ValueError(
            f"`estimator` must be one of {ESTIMATORS} (aliases: 'explinear', 'exp-linear'). "
            f"Received: estimator={estimator!r}")
    return _ALIASES[estimator.lower()]


class PriorityTable(NamedTuple):
    """Priority table of one shard.

    Attributes:
        p: float32 [n], last computed priority p_i.
        t: int32 [n], step t_i at which p_i was computed.
        a: float32 [n], fitted log-decay rate a_i (0 for ``keep``).
    """

    p: tf.Tensor
    t: tf.Tensor
    a: tf.Tensor


def estimate_priorities(table: PriorityTable, step: tf.Tensor, estimator: str) -> tf.Tensor:
    """p̂_i(t) for every example: float32 [n]. See ``PrioritizedSampler``."""
    if canonical_estimator(estimator) == "keep":
        return table.p
    age = tf.cast(tf.cast(step, tf.int32) - table.t, tf.float32)
    return table.p * tf.exp(table.a * age)


def refresh_priorities(table: PriorityTable, idx: tf.Tensor, p_new: tf.Tensor, step: tf.Tensor,
                       estimator: str, theta_e: float = 0.8) -> PriorityTable:
    """Table after storing new priorities ``p_new`` [R] of the examples ``idx`` [R] at ``step``.

    ``exp-decay`` update at t = ``step`` for each refreshed i (nothing changes when t = t_i):
    ℓ = log(p′/p_i) if p_i ≠ 0 and p′/p_i > 0 else 0; a_i ← θ_e·ℓ/(t − t_i) + (1 − θ_e)·a_i;
    p_i ← p′; t_i ← t. ``keep`` sets p_i ← p′, t_i ← t. ``idx`` must not repeat.
    """
    estimator = canonical_estimator(estimator)
    idx = tf.reshape(tf.cast(idx, tf.int32), [-1, 1])
    p_new = tf.cast(p_new, tf.float32)
    step = tf.cast(step, tf.int32)
    p_old = tf.gather_nd(table.p, idx)
    t_old = tf.gather_nd(table.t, idx)
    a_old = tf.gather_nd(table.a, idx)
    t_new = tf.fill(tf.shape(t_old), step)
    if estimator == "keep":
        return PriorityTable(tf.tensor_scatter_nd_update(table.p, idx, p_new),
                             tf.tensor_scatter_nd_update(table.t, idx, t_new), table.a)
    age = step - t_old
    ratio = tf.math.divide_no_nan(p_new, p_old)
    usable = tf.logical_and(tf.not_equal(p_old, 0.0), ratio > 0.0)
    log_ratio = tf.where(usable, tf.math.log(tf.where(usable, ratio, 1.0)), 0.0)
    rate = log_ratio / tf.cast(tf.maximum(age, 1), tf.float32)
    a_fit = theta_e * rate + (1.0 - theta_e) * a_old
    is_new = age != 0
    return PriorityTable(
        tf.tensor_scatter_nd_update(table.p, idx, tf.where(is_new, p_new, p_old)),
        tf.tensor_scatter_nd_update(table.t, idx, tf.where(is_new, t_new, t_old)),
        tf.tensor_scatter_nd_update(table.a, idx, tf.where(is_new, a_fit, a_old)))
