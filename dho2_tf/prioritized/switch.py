"""When importance sampling pays for itself: the variance-reduction factor τ.

Katharopoulos & Fleuret (ICML 2018, §3.3–3.4) switch importance sampling on only when the
variance of the gradient estimate drops enough to pay for the extra work. With a per-example
gradient-norm estimate s_i (here from the priority table: s_i = sqrt(p̂_i⁺) for ``length``
priorities, s_i = p̂_i⁺ for the others, i.e. the same ψ_i the proposal uses) and one draw
i ~ q weighted by 1/(n·q_i), the trace of the covariance of the estimate of ḡ = (1/n) Σ_i g_i is

    V(q) = (1/n²) Σ_i s_i²/q_i − ‖ḡ‖²,   and for uniform u_i = 1/n:   V(u) = (1/n) Σ_i s_i² − ‖ḡ‖².

Dropping the common ‖ḡ‖² term (which can only make the ratio smaller, so the estimate is
conservative) gives the equivalent batch-size factor

    τ = V(u)/V(q) ≈ n Σ_i s_i² / Σ_i s_i²/q_i

(τ ≥ 1 for q ∝ s and, by convexity of 1/q, for its mixture with the uniform floor; τ = 1 if
all s_i are equal): a step with K importance draws is worth a uniform step with τ·K draws.
Over P ranks the step averages the ranks' estimates, so the numerator and denominator are
summed over ranks (with n_j-normalised terms), giving one τ that every rank shares. The
decision uses an exponential moving average τ̄ ← m·τ̄ + (1 − m)·τ and samples by importance only
while τ̄ > τ_th.

Importance sampling is worth its cost when τ exceeds the cost ratio ĉ of an importance step
to a uniform step (Katharopoulos & Fleuret, §3.4, switch on when τ exceeds the cost ratio of
their importance step to a uniform one). The sampler measures ĉ
from the run's own step times (:func:`cost_ratio_from_times`), sums the per-rank mean times in
the same allreduce as the variance terms, and decides on τ̄ > max(τ_th, ĉ).

Two estimates of the terms are offered. :func:`variance_terms` reads the whole priority table;
stale entries (computed at older weights, usually larger) inflate it, so with
``refresh="free"`` the sampler uses :func:`sample_variance_terms` instead, estimates from the
fresh scores of the step's own batch (drawn from q′ with weights w_j = 1/(K·n·q′_j)):
V_u ≈ Σ_j w_j s_j² (unbiased) and, with B = Σ_j w_j s_j ≈ (1/n) Σ_i s_i so that
n·q_i ≈ (1 − γ)·s_i/B + γ for the proposal built from fresh scores,
V_q ≈ Σ_j w_j s_j² / ((1 − γ)·s_j/B + γ).
"""

from __future__ import annotations

import tensorflow as tf


def variance_terms(p_hat: tf.Tensor, q: tf.Tensor, use_sqrt: bool) -> tf.Tensor:
    """``[V_u, V_q]`` = [(1/n) Σ s_i², (1/n²) Σ s_i²/q_i] of one shard: float32 [2].

    Args:
        p_hat: float32 [n], estimated priorities.
        q: float32 [n], the importance proposal (every q_i > 0).
        use_sqrt: s_i = sqrt(p̂_i⁺) (length priorities) instead of s_i = p̂_i⁺.
    """
    s = tf.maximum(p_hat, 0.0)
    s_sq = s if use_sqrt else tf.square(s)
    n = tf.cast(tf.size(p_hat), tf.float32)
    return tf.stack([tf.reduce_sum(s_sq) / n, tf.reduce_sum(s_sq / q) / (n * n)])


def tau_from_terms(terms: tf.Tensor) -> tf.Tensor:
    """τ = V_u / V_q (1 when both vanish, i.e. every priority is 0)."""
    return tf.where(terms[1] > 0.0, tf.math.divide_no_nan(terms[0], terms[1]), 1.0)


def cost_ratio_from_times(light: tf.Tensor, full: tf.Tensor) -> tf.Tensor:
    """ĉ = T_full / T_light, or 1 until both step kinds have a time (either is 0).

    Args:
        light: float32 [], (sum over ranks of the) mean time of a light (uniform) step.
        full: float32 [], (sum over ranks of the) mean time of a full (importance) step.
    """
    measured = tf.logical_and(light > 0.0, full > 0.0)
    return tf.where(measured, tf.math.divide_no_nan(full, light), 1.0)


def sample_variance_terms(s: tf.Tensor, weights: tf.Tensor, gamma: float) -> tf.Tensor:
    """``[V_u, V_q]`` estimated from a batch: float32 [2] (see the module docstring).

    Args:
        s: float32 [K], fresh norm proxies s_j ≥ 0 of the batch's draws.
        weights: float32 [K], their weights 1/(K·n·q′_j) (1/K for uniform draws).
        gamma: the proposal's uniform floor γ.
    """
    v_u = tf.reduce_sum(weights * tf.square(s))
    mean_s = tf.reduce_sum(weights * s)
    n_q = (1.0 - gamma) * tf.math.divide_no_nan(s, mean_s) + gamma
    v_q = tf.reduce_sum(weights * tf.square(s) / n_q)
    return tf.stack([v_u, v_q])
