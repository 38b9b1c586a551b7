"""One FOSI hybrid step on this rank's shard of the flat parameter vector.

See :class:`dho2_tf.DHO2` for the update equations. This module holds the maths as a pure function
of tensors plus a communicator; it knows nothing of Keras variables. With ``LocalComm`` (P = 1,
or a layout that keeps V in full on every rank) it is exactly single-process FOSI (Sivan et al.,
"FOSI: Hybrid First and Second Order Optimization", ICLR 2024, Alg. 1); with V sharded over P
ranks it is the same update, because every product with V splits over the shards:

    V G = Σ_r V_r G_r,   (Vᵀa)_r = V_rᵀa,   V·(Vᵀq) = Γq   (Γ = V Vᵀ)

Vectors in K coordinates. Between two refreshes V is fixed, and every update adds multiples of
Vᵀ(K-vector) to the parameter-sized state, so that state is kept as a plain vector plus Vᵀ of a
K-vector whose coefficients a step updates without touching n numbers:

* the Newton momentum m = Vᵀc + d·m₀: c ← A_g·a + A_m·c, d ← A_m·d, and V m = Γc + d·V m₀;
* the heavy-ball buffer of ``momentum``/``nesterov`` b = B − Vᵀq: B ← G + β·B, q ← a + β·q,
  and V b = P − Γq with P = V B updated as P ← a + β·P.

V m₀ and V B are computed once after each refresh (they are cached with the refresh count they
belong to); before V changes :func:`materialize` folds the coefficients back into the vectors.
For these linear base rules the whole step then needs only V·G and one combine:

    u = −L·(w − Vᵀw_q),   V u = −L·(w_P − Γw_q),   δ = −L·w − Vᵀ(V u + α·η⊙e − L·w_q)

with L = lr·c_scale and (w, w_q, w_P) = (G, a, a) for sgd, (B, q, P) for momentum and
(G + β·B, a + β·q, a + β·P) for nesterov (all after their update). Adam is not linear, so it
forms g₂ = G − Vᵀa and V·u explicitly: four passes over V. In every case

    c_scale·(u − Vᵀ(V u)) − α·Vᵀ(η⊙e) = u′ − Vᵀ(V u′ + α·η⊙e),   u′ = c_scale·u,

so the projection of the base step and the Newton step share one combine.

Collectives per step on sharded state: one allreduce of [V_r G_r ; ‖G_r‖²] (K + 1 numbers,
plus K or 2K once after a refresh) and, for Adam only, one allreduce of V_r u_r (K numbers).
‖Ḡ‖² is the step's finite check (no pass over δ) and the divergence guard's signal.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import tensorflow as tf

from dho2_tf.base_rules import BaseRule
from dho2_tf.distributed.comm import Communicator, Group
from dho2_tf.numerics import scalar


class CurvatureSubspace(NamedTuple):
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


class StepState(NamedTuple):
    """The optimizer state one step reads (see the module docstring for the K coordinates).

    Attributes:
        momentum_r: float [s], m₀ (this rank's shard).
        momentum_coeffs: float [K], c.
        momentum_decay: float scalar, d.
        slots_r: the base rule's slots, each float [s] (B for ``momentum``/``nesterov``).
        slot_coeffs: float [K], q (``momentum``/``nesterov``; ignored otherwise).
        cached: float [K·(1 + rule.linear_buffer)], [V m₀ ; V B] from an earlier step.
        fresh: bool scalar, whether ``cached`` still holds those products (else recomputed).
    """

    momentum_r: tf.Tensor
    momentum_coeffs: tf.Tensor
    momentum_decay: tf.Tensor
    slots_r: list[tf.Tensor]
    slot_coeffs: tf.Tensor
    cached: tf.Tensor
    fresh: tf.Tensor


class HybridResult(NamedTuple):
    """Output of :func:`hybrid_displacement`: the displacement and the state to commit.

    Attributes:
        delta_r: float [s], θ_r ← θ_r + delta_r (meaningless when ``finite`` is False).
        momentum_coeffs: float [K], the new c.
        momentum_decay: float scalar, the new d.
        slots_r: the new base slots, each float [s] (empty when updated in place).
        slot_coeffs: float [K], the new q.
        cached: the products valid for the new state, to cache.
        gradient_finite: bool scalar, whether ‖Ḡ‖² is finite, i.e. Ḡ holds no NaN/Inf (and
            its squared norm does not overflow).
        finite: bool scalar, whether the step is finite: ``gradient_finite`` and every
            K-vector the displacement is formed from is finite (see :func:`hybrid_displacement`).
        grad_sq_norm: float scalar, ‖Ḡ‖² (over the ranks sharing the shards).
    """

    delta_r: tf.Tensor
    momentum_coeffs: tf.Tensor
    momentum_decay: tf.Tensor
    slots_r: list[tf.Tensor]
    slot_coeffs: tf.Tensor
    cached: tf.Tensor
    gradient_finite: tf.Tensor
    finite: tf.Tensor
    grad_sq_norm: tf.Tensor


#: ``in_place(g, lr, init) -> init + u``: a base step that updates its slots in place
#: (``lr`` the scaled learning rate L; for Adam ``g`` is g₂ and ``init`` is None).
InPlaceStep = Callable[[tf.Tensor, tf.Tensor, "tf.Tensor | None"], tf.Tensor]

#: ``control(‖Ḡ‖²) -> (c, α)``: the base learning-rate scale and Newton step size this step
#: uses (:class:`dho2_tf.guard.StepGuard`; ``None``: the curvature's c and the given α).
StepControl = Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]


def hybrid_displacement(g_r: tf.Tensor, state: StepState, curvature: CurvatureSubspace,
                        rule: BaseRule, learning_rate: tf.Tensor, alpha: float, step: tf.Tensor,
                        comm: Communicator, *, in_place: InPlaceStep | None = None,
                        control: StepControl | None = None, process_set: Group | None = None,
                        name: str = "dho2") -> HybridResult:
    """FOSI displacement of this rank's shard (see :class:`dho2_tf.DHO2`, ``Math:``).

    Math (Σ_r: allreduce over ``process_set``, identity with ``LocalComm``)::

        [a ; s] = Σ_r [V_r G_r ; ‖G_r‖²]        (with [V m₀ ; V B] when not cached)
        (c_scale, α) = control(s)               (the curvature's c and α without control)
        c ← A_g·a + A_m·c,  d ← A_m·d,  e = Γc + d·V m₀            (e = V m, m ← M(g₁, m))
        linear bases:  see the module docstring (u, V u and δ from K-vectors and one combine)
        adam:          g₂ = G_r − V_rᵀa,  u′ = Base(g₂; lr·c_scale),  f′ = Σ_r V_r u′,
                       δ_r = u′ − V_rᵀ(f′ + α·η⊙e)

    The finite check needs no pass over δ: δ_r = (element-wise base step of G_r and the base
    slots) − V_rᵀk with one K-vector k, so δ is finite when s = ‖Ḡ‖² is (no NaN/Inf in Ḡ) and
    k is (for Adam, f′ + α·η⊙e: f′ is NaN when u′ is, since every product of V u′ is
    evaluated). ``finite`` reports that; the slots, finite by induction, are not re-checked,
    so only a base step overflowing from a finite gradient goes unnoticed. The in-place base
    step (``in_place``) runs only when the gradient is finite (Adam) or the whole step is
    (linear bases), on every rank alike; otherwise ``delta_r`` is ``g_r`` (not to be applied).

    Cost, full-length passes (element-wise kernels over s entries; V passes apart):
    sgd/momentum/nesterov in place: ‖G_r‖², out ← −V_rᵀk (≤ 1, a buffer move when TF can),
    one fused base kernel: 2-3 + 2 V. Out of place: 3 (sgd), 5 (momentum), 7 (nesterov)
    + 2 V. Adam: ‖G_r‖², g₂, the fused kernel and its zeroing, δ: 5 + 4 V (V G, V_rᵀa, V u′,
    V_rᵀ(f′ + α·η⊙e); u′ depends element-wise on g₂, so its projection needs two passes of
    its own).

    Args:
        g_r: float [s], this rank's shard of the rank-averaged gradient Ḡ.
        state: the momentum, the base slots and their K coordinates.
        curvature: V_r, Γ, η and c_scale.
        rule: the base optimizer.
        learning_rate: scalar base learning rate.
        alpha: Newton step size α.
        step: 1-based step count (Adam's bias correction).
        comm: communicator; the small allreduces run over ``process_set``.
        in_place: the base rule's in-place step (``None``: :meth:`BaseRule.displacement`).
        control: maps ‖Ḡ‖² to this step's (c_scale, α) (``None``: c_scale and ``alpha``).
        process_set: ranks sharing the shards (``None``: all ranks).
        name: prefix of the collective names.

    Returns:
        The displacement shard and the new state (see :class:`HybridResult`).
    """
    v_r, gram = curvature.vectors_r, curvature.gram
    dtype = g_r.dtype
    k = v_r.shape[0]
    a_g, a_m = rule.newton_coefficients
    buffered = rule.linear_buffer
    stale = [state.momentum_r] + ([state.slots_r[0]] if buffered else [])
    # One fused collective: a = V Ḡ, ‖Ḡ‖² and, once after a refresh, [V m₀ ; V B].
    a, sq_norm, fresh_products = comm.grouped_allreduce(
        [tf.linalg.matvec(v_r, g_r),                                           # V pass 1
         tf.reshape(tf.tensordot(g_r, g_r, 1), [1]),                           # pass 1
         tf.cond(state.fresh, lambda: tf.zeros([k * (1 + buffered)], dtype),
                 lambda: tf.reshape(tf.matmul(tf.stack(stale), v_r, transpose_b=True), [-1]))],
        "sum", name=f"{name}/project_g", process_set=process_set)
    sq_norm = sq_norm[0]
    gradient_finite = tf.math.is_finite(sq_norm)
    if control is None:
        scale, alpha_t = curvature.scale, scalar(alpha, dtype)
    else:
        scale, alpha_t = control(sq_norm)
    cached = tf.where(state.fresh, state.cached, fresh_products)
    coeffs = _affine(a_g, a, a_m, state.momentum_coeffs)
    decay = a_m * state.momentum_decay
    e = tf.linalg.matvec(gram, coeffs) + decay * cached[:k]
    lr = tf.cast(learning_rate, dtype) * scale                                 # L
    newton = alpha_t * curvature.rates * e
    if rule.linear:
        slots, q, cached_new = [], state.slot_coeffs, cached
        w_q, w_p = a, a
        beta = scalar(rule.momentum, dtype)
        if buffered:
            q = a + beta * state.slot_coeffs                                   # q ← a + βq
            p = a + beta * cached[k:]                                          # P ← a + βP
            cached_new = tf.concat([cached[:k], p], 0)
            w_q, w_p = (q, p) if rule.name == "momentum" else (a + beta * q, a + beta * p)
        f = -lr * (w_p - tf.linalg.matvec(gram, w_q))                          # V u′
        combine = f + newton - lr * w_q                                        # k
        finite = gradient_finite & all_finite(combine) & tf.math.is_finite(lr)
        if in_place is not None:
            delta_r = tf.cond(finite, lambda: in_place(                        # V pass 2, 1
                g_r, lr, tf.linalg.matvec(v_r, -combine, transpose_a=True)), lambda: g_r)
        else:
            w = g_r
            if buffered:
                buf = g_r + beta * state.slots_r[0]                            # B ← G + βB
                slots = [buf]
                w = buf if rule.name == "momentum" else g_r + beta * buf
            delta_r = _minus_combine(-lr * w, combine, v_r)                    # V pass 2
        return HybridResult(delta_r, coeffs, decay, slots, q, cached_new, gradient_finite,
                            finite, sq_norm)
    g2_r = _minus_combine(g_r, a, v_r)                                         # V pass 2
    if in_place is None:
        u_r, slots = rule.displacement(g2_r, state.slots_r, lr, step)
    else:
        u_r = tf.cond(gradient_finite, lambda: in_place(g2_r, lr, None), lambda: g2_r)
        slots = []
    f = comm.allreduce(tf.linalg.matvec(v_r, u_r), "sum",                     # V pass 3
                       name=f"{name}/project_u", process_set=process_set)
    combine = f + newton
    delta_r = _minus_combine(u_r, combine, v_r)                               # V pass 4
    finite = gradient_finite & all_finite(combine)
    return HybridResult(delta_r, coeffs, decay, slots, state.slot_coeffs, cached,
                        gradient_finite, finite, sq_norm)


def materialize(vector_r: tf.Tensor, coeffs: tf.Tensor, vectors_r: tf.Tensor,
                scale: tf.Tensor | float = 1.0) -> tf.Tensor:
    """scale·x_r + V_rᵀ·coeffs: a vector kept in K coordinates, as a plain shard.

    The Newton momentum is ``materialize(m₀, c, V, d)``, the heavy-ball buffer
    ``materialize(B, −q, V)``.
    """
    base = vector_r if isinstance(scale, float) and scale == 1.0 else scale * vector_r
    return _minus_combine(base, -coeffs, vectors_r)


def _minus_combine(x: tf.Tensor, coeffs: tf.Tensor, v_r: tf.Tensor) -> tf.Tensor:
    """x − V_rᵀ·coeffs ([s]): one pass over V and one element-wise pass."""
    return x - tf.linalg.matvec(v_r, coeffs, transpose_a=True)


def _affine(a_x: float, x: tf.Tensor, a_y: float, y: tf.Tensor) -> tf.Tensor:
    """a_x·x + a_y·y with the multiplications by 1 and the zero terms left out."""
    out = x if a_x == 1.0 else a_x * x
    if a_y:
        out = out + (y if a_y == 1.0 else a_y * y)
    return out


def all_finite(x: tf.Tensor) -> tf.Tensor:
    """bool scalar: whether every entry of ``x`` is finite (no NaN, no ±Inf)."""
    return tf.reduce_all(tf.math.is_finite(x))


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
    shifted = eigenvalues + scalar(damping, eigenvalues.dtype)
    safe = tf.where(valid & (shifted != 0), shifted, tf.ones_like(shifted))
    rates = tf.where(valid & (shifted != 0), tf.abs(1.0 / safe), tf.zeros_like(shifted))
    top, kth = rates[-1], rates[ell]
    ratio = tf.where((top > 0) & (kth > 0), kth / tf.where(top > 0, top, 1.0), 1.0)
    scale = tf.clip_by_value(ratio, 1.0, scalar(c_max, rates.dtype))
    return rates, scale


def refresh_count_due(iterations: int, warmup: int, refresh_every: int) -> int:
    """How many curvature refreshes should have run before update ``iterations`` is applied.

    FOSI's schedule (Sivan et al., ICLR 2024, §3): before applying update t, refresh iff
    t+1 ≥ W and (t+1−W) mod T = 0. Counting the triggers up to t, rather than testing t alone,
    keeps the schedule right after a resume and when Keras runs several steps per callback.
    """
    t1 = iterations + 1
    if t1 < warmup:
        return 0
    return (t1 - warmup) // refresh_every + 1


def next_refresh_step(refreshes: int, warmup: int, refresh_every: int) -> int:
    """The first update t before which refresh number ``refreshes`` (0-based) is due.

    The smallest t with ``refresh_count_due(t, W, T) > refreshes``, i.e.
    t = max(W − 1 + refreshes·T, 0); comparing a step counter with it is all a step between
    refreshes needs.
    """
    return max(warmup - 1 + refreshes * refresh_every, 0)
