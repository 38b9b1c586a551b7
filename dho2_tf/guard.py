"""The step's divergence guard: between refreshes, watch ‖Ḡ‖² and fall back towards the base step.

Between two refreshes the eigenpairs go stale while the step keeps multiplying the base step
by c = clip(|λ_max|/|λ_(k)|, 1, c_max) in the complement of span(V) and taking Newton steps
α·η⊙(V m) in it. When that stops being safe the loss, and with it the averaged gradient, grows.
The guard reads the one number every step already computes for its finite check, s = ‖Ḡ‖²
(summed over the shards in the step's own fused allreduce, so every rank sharing the state
sees the same value and takes the same decision), and keeps, in checkpointed variables:

    μ ← ρ·μ + (1−ρ)·s   (μ = s at the first step; ρ = ``GUARD_DECAY``)
    r = μ just before the first step after each refresh (the gradient level the eigenpairs were
        installed at); if the previous window had tripped, r ← min(r, μ) and μ restarts from s
    level = max(level, [μ > κ·r] + [μ > κ²·r])    once a refresh has happened (κ: DHO2's ``guard``)

and level is reset to 0 at the first step after the next refresh. The step then uses

    level 0: c, α (FOSI);   level 1: c = 1, α/2;   level 2: c = 1, α = 0 (the base step alone)

so a trip can only move the step towards its base optimizer at the base learning rate. Each
rise of the level is one trip: ``state.guard_trips`` counts them, each is logged once on rank 0,
and ``curvature_metrics()`` reports ``guard_trips``, ``guard_level`` and ``guard_ratio`` (μ/r).
A refresh schedule may refresh early on a trip: read ``state.guard_trips`` (or ``guard_level``
> 0) in an eager hook and compare it with the value seen at the last refresh; it is the same on
every rank at the same step, so every rank takes the same decision. Non-finite
steps are skipped before the guard's state is updated. In ``admm`` the gradient is each rank's
own, so there the decisions are rank-local (its steps issue no collective either).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import tensorflow as tf

from dho2_tf.numerics import scalar

logger = logging.getLogger(__name__)

#: ρ of the running average μ of ‖Ḡ‖² (about the last ten steps).
GUARD_DECAY = 0.9

#: Factor on α at guard level 0, 1 and 2.
ALPHA_FACTORS = (1.0, 0.5, 0.0)


class GuardDecision(NamedTuple):
    """One step's guard outcome (tensors; committed only when the step is applied).

    Attributes:
        scale: the base learning-rate scale c this step uses.
        alpha: the Newton step size α this step uses.
        average: the new μ.
        reference: the new r.
        level: the new level (int64).
        window: the refresh count r belongs to (int64).
        tripped: bool, whether the level rose at this step.
        ratio: μ / r (0 before the first refresh).
    """

    scale: tf.Tensor
    alpha: tf.Tensor
    average: tf.Tensor
    reference: tf.Tensor
    level: tf.Tensor
    window: tf.Tensor
    tripped: tf.Tensor
    ratio: tf.Tensor


def guard_decision(sq_norm: tf.Tensor, average: tf.Tensor, reference: tf.Tensor,
                   level: tf.Tensor, window: tf.Tensor, refreshes: tf.Tensor, scale: tf.Tensor,
                   alpha: float, factor: float) -> GuardDecision:
    """The guard's update from s = ‖Ḡ‖² (see the module docstring for the equations).

    Args:
        sq_norm: float scalar s (identical on every rank sharing the state).
        average, reference: μ and r before this step.
        level, window: the level and the refresh count r belongs to (int64).
        refreshes: the refreshes done so far (int64).
        scale: the curvature's c. alpha: the configured α. factor: κ > 1.
    """
    dtype = sq_norm.dtype
    zero = tf.zeros([], dtype)
    new_window = tf.not_equal(refreshes, window)
    ref = tf.where(new_window, tf.where(level > 0, tf.minimum(reference, average), average),
                   reference)
    base_level = tf.where(new_window, tf.zeros_like(level), level)
    restart = new_window & (level > 0)        # the tripped window's average is not carried on
    previous = tf.where(restart, zero, average)
    decay = scalar(GUARD_DECAY, dtype)
    mean = tf.where(previous > zero, decay * previous + (1.0 - decay) * sq_norm, sq_norm)
    ref = tf.where(ref > zero, ref, mean)
    ratio = tf.where((ref > zero) & (refreshes > 0), mean / tf.where(ref > zero, ref, 1.0),
                     zero)
    kappa = scalar(factor, dtype)
    target = tf.cast(ratio > kappa, tf.int64) + tf.cast(ratio > kappa * kappa, tf.int64)
    new_level = tf.maximum(base_level, target)
    factors = tf.constant(ALPHA_FACTORS, dtype)
    return GuardDecision(
        scale=tf.where(new_level > 0, tf.ones_like(scale), scale),
        alpha=scalar(alpha, dtype) * tf.gather(factors, new_level),
        average=mean, reference=ref, level=new_level, window=refreshes,
        tripped=new_level > base_level, ratio=ratio)


def log_trip(step: tf.Tensor, level: tf.Tensor, ratio: tf.Tensor, trips: tf.Tensor,
             is_root: bool, factor: float) -> None:
    """One log line per trip, on rank 0 (called from the step graph)."""
    if not is_root:
        return
    response = "c=1 and alpha halved" if int(level.numpy()) == 1 else \
        "the base step alone (c=1, alpha=0)"
    logger.warning("DHO2 step %d: the averaged gradient's squared norm grew %.1fx over its level "
                   "at the last curvature refresh (guard=%g); until the next refresh "
                   "the step uses %s (guard trip %d)", int(step.numpy()), float(ratio.numpy()),
                   factor, response, int(trips.numpy()))


def guard_metrics(state) -> dict[str, float]:
    """``guard_trips``, ``guard_level`` and ``guard_ratio`` (μ/r) of an optimizer state."""
    reference = float(state.guard_reference.numpy())
    return {"guard_trips": float(state.guard_trips.numpy()),
            "guard_level": float(state.guard_level.numpy()),
            "guard_ratio": float(state.guard_average.numpy()) / reference if reference > 0
            else 0.0}
