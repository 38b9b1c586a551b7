"""One FOSI hybrid step on this rank's shard of the flat parameter vector.

See :class:`dho2_tf.DHO2` for the update equations. This module holds the maths as a pure function
of tensors plus a communicator; it knows nothing of Keras variables. With ``LocalComm`` (P = 1)
it is exactly single-process FOSI (algorithm reference §3.2); with P ranks it is the sharded form
of §5.2, which is mathematically the same update:

    V G = Σ_r V_r G_r,   (Vᵀa)_r = V_rᵀa,   V·M(g₁, m) = A_g·Γa + A_m·V m   (Γ = V Vᵀ)

so the Newton coefficients need one fused allreduce of [V_r G_r ; V_r m_r] (2K numbers) and the
projection of the base step one more allreduce of V_r u_r (K numbers).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import tensorflow as tf

from dho2_tf.base_rules import BaseRule
from dho2_tf.distributed.comm import Communicator, Group


class Curvature(NamedTuple):
    """Curvature state used by the hybrid step (all replicated except ``vectors_r``).

    Attributes:
        vectors_r: float [K, s], this rank's columns of V (zero rows before the first refresh).
        gram: float [K, K], Γ = V Vᵀ.
        rates: float [K], η (0 for directions that carry no eigenpair).
        scale: float scalar, c = clip(|λ_max|/|λ_(k)|, 1, c_max) (1 before the first refresh).
    """

    vectors_r: tf.Tensor
    gram: tf.Tensor
    rates: tf.Tensor
    scale: tf.Tensor


class HybridResult(NamedTuple):
    """Output of :func:`hybrid_displacement`.

    Attributes:
        delta_r: float [s], θ_r ← θ_r + delta_r (zero when ``finite`` is False).
        newton_momentum_r: float [s], the new Newton momentum shard (unchanged if not finite).
        base_slots_r: new base-optimizer slots, each float [s] (unchanged if not finite).
        finite: bool scalar, identical on every rank sharing the shards: whether the gradient
            and the base step were finite everywhere. A non-finite step changes nothing.
    """

    delta_r: tf.Tensor
    newton_momentum_r: tf.Tensor
    base_slots_r: list[tf.Tensor]
    finite: tf.Tensor


def _rows_times(v_r: tf.Tensor, x_r: tf.Tensor) -> tf.Tensor:
    """V_r x_r: [K, s] · [s] → [K]."""
    return tf.linalg.matvec(v_r, x_r)


def _combine(v_r: tf.Tensor, coeffs: tf.Tensor) -> tf.Tensor:
    """V_rᵀ coeffs: [K, s]ᵀ · [K] → [s]."""
    return tf.linalg.matvec(v_r, coeffs, transpose_a=True)


def hybrid_displacement(g_r: tf.Tensor, newton_momentum_r: tf.Tensor,
                        base_slots_r: Sequence[tf.Tensor], curvature: Curvature,
                        rule: BaseRule, learning_rate: tf.Tensor, alpha: float,
                        step: tf.Tensor, comm: Communicator, *,
                        process_set: Group | None = None, name: str = "dho2") -> HybridResult:
    """FOSI displacement of this rank's shard. See :class:`dho2_tf.DHO2` (``Math:``).

    Args:
        g_r: float [s], this rank's shard of the rank-averaged gradient Ḡ.
        newton_momentum_r: float [s], Newton momentum shard m_r.
        base_slots_r: base-optimizer slots, each float [s].
        curvature: V_r, Γ, η and c.
        rule: the base optimizer.
        learning_rate: scalar base learning rate.
        alpha: Newton step size α.
        step: 1-based step count (Adam's bias correction).
        comm: communicator; the two small allreduces run over ``process_set``.
        process_set: ranks sharing the shards (``None``: all ranks).
        name: prefix of the collective names.

    Returns:
        The displacement, and the new momentum and slots.
    """
    v_r = curvature.vectors_r
    k = v_r.shape[0]
    a_g, a_m = rule.newton_coefficients
    dtype = g_r.dtype
    # The non-finite counts ride along in the two small allreduces, so every rank agrees.
    ab = comm.allreduce(tf.concat([_rows_times(v_r, _zero_nonfinite(g_r)),
                                   _rows_times(v_r, newton_momentum_r),
                                   _nonfinite_count(g_r, dtype)], 0),
                        "sum", name=f"{name}/project_g_m", process_set=process_set)
    a, b, bad_g = ab[:k], ab[k:2 * k], ab[2 * k]
    g_r = _zero_nonfinite(g_r)
    g1_r = _combine(v_r, a)
    g2_r = g_r - g1_r
    new_momentum_r = a_g * g1_r + a_m * newton_momentum_r if a_m else a_g * g1_r
    # e = V·m_new = A_g·Γa + A_m·V m_old, without another collective.
    e = a_g * tf.linalg.matvec(curvature.gram, a) + a_m * b
    d_r = _combine(v_r, curvature.rates * e)
    u_r, new_slots = rule.displacement(g2_r, base_slots_r, tf.cast(learning_rate, dtype), step)
    f_bad = comm.allreduce(tf.concat([_rows_times(v_r, _zero_nonfinite(u_r)),
                                      _nonfinite_count(u_r, dtype)], 0),
                           "sum", name=f"{name}/project_u", process_set=process_set)
    finite = tf.equal(bad_g + f_bad[k], 0.0)
    u_r = u_r - _combine(v_r, f_bad[:k])
    delta_r = curvature.scale * u_r - tf.cast(alpha, dtype) * d_r
    keep = lambda new, old: tf.where(finite, new, old)  # noqa: E731
    return HybridResult(tf.where(finite, delta_r, tf.zeros_like(delta_r)),
                        keep(new_momentum_r, newton_momentum_r),
                        [keep(n, o) for n, o in zip(new_slots, base_slots_r)], finite)


def _nonfinite_count(x: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """[1] float: number of NaN/Inf entries of ``x``."""
    return tf.reshape(tf.cast(tf.math.count_nonzero(~tf.math.is_finite(x)), dtype), [1])


def _zero_nonfinite(x: tf.Tensor) -> tf.Tensor:
    """``x`` with NaN/Inf replaced by 0 (so projections stay finite; the step is skipped)."""
    return tf.where(tf.math.is_finite(x), x, tf.zeros_like(x))


def newton_rates(eigenvalues: tf.Tensor, valid: tf.Tensor, damping: float, ell: int,
                 c_max: float) -> tuple[tf.Tensor, tf.Tensor]:
    """η_j = |1/(λ_j + σ_d)| on valid pairs (0 elsewhere) and c = clip(η_ℓ/η_{K−1}, 1, c_max).

    Args:
        eigenvalues: float [K], ordered [ℓ smallest ascending ; k largest ascending].
        valid: bool [K], which pairs were estimated.
        damping: σ_d.
        ell: ℓ, so index ℓ is the k-th largest eigenvalue and K−1 the largest.
        c_max: upper clip of the base learning-rate scale.

    Returns:
        ``(rates [K], scale [])``; scale is 1 unless both index ℓ and K−1 are valid.
    """
    shifted = eigenvalues + tf.cast(damping, eigenvalues.dtype)
    safe = tf.where(valid & (shifted != 0), shifted, tf.ones_like(shifted))
    rates = tf.where(valid & (shifted != 0), tf.abs(1.0 / safe), tf.zeros_like(shifted))
    top, kth = rates[-1], rates[ell]
    ratio = tf.where((top > 0) & (kth > 0), kth / tf.where(top > 0, top, 1.0), 1.0)
    scale = tf.clip_by_value(ratio, 1.0, tf.cast(c_max, rates.dtype))
    return rates, scale


def refresh_count_due(iterations: int, warmup: int, refresh_every: int) -> int:
    """How many curvature refreshes should have run before update ``iterations`` is applied.

    FOSI's schedule (reference §3.4): before applying update t, refresh iff t+1 ≥ W and
    (t+1−W) mod T = 0. Counting the triggers up to t, rather than testing t alone, keeps the
    schedule right after a resume and when Keras runs several steps per callback.
    """
    t1 = iterations + 1
    if t1 < warmup:
        return 0
    return (t1 - warmup) // refresh_every + 1
