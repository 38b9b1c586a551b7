"""The hybrid step of dho2_tf/hybrid.py on its own, against numpy.

hybrid_displacement keeps the Newton momentum and the heavy-ball buffer in K coordinates
(m = Vᵀc + d·m₀, b = B − Vᵀq) and caches [V m₀ ; V B]; the numpy reference keeps the plain
n-vectors and applies the FOSI equations of the module docstring literally:

    a = V G,  g₁ = Vᵀa,  g₂ = G − g₁,  m ← A_g·g₁ + A_m·m,  e = V m,
    u = Base(g₂; lr·c),  δ = u − Vᵀ(V u) − α·Vᵀ(η⊙e).

The whole optimizer is compared with numpy FOSI in test_fosi_reference.py; here the state is
arbitrary (non-zero m₀ and buffers, a V with a zero row), V changes mid-run (materialize), the
shards of V are split over P simulated ranks, and Adam also runs with its in-place kernel.
Float64 throughout, with hyper-parameters exact in float32 (the code casts them through it),
so the comparisons are to ~1e-12.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from dho2_tf.base_rules import BaseRule
from dho2_tf.distributed.comm import LocalComm
from dho2_tf.distributed.sharding import ShardLayout
from dho2_tf.hybrid import (CurvatureSubspace, StepState, all_finite, hybrid_displacement,
                            materialize, newton_rates, next_refresh_step, refresh_count_due)
from tests.helpers.ranks import run_on_ranks
from tests.unit.optimizer.test_fosi_reference import numpy_base

N, K = 13, 4
LR, ALPHA, C_SCALE = 0.125, 0.375, 1.5
BETA, B1, B2, EPS = 0.875, 0.875, 1.0 - 2.0 ** -10, 2.0 ** -24
RULES = {"sgd": BaseRule("sgd"), "momentum": BaseRule("momentum", momentum=BETA),
         "nesterov": BaseRule("nesterov", momentum=BETA),
         "adam": BaseRule("adam", beta_1=B1, beta_2=B2, epsilon=EPS)}
STEPS = 6


def basis(seed):
    """K × n: three orthonormal rows and a zero row (a pair that was not estimated)."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((N, K - 1)))
    return np.vstack([q.T, np.zeros((1, N))])


def rates(seed):
    eta = np.random.default_rng(seed).uniform(0.2, 2.0, K)
    eta[-1] = 0.0                                   # the zero row carries no eigenpair
    return eta


def initial(name, seed=7):
    """Non-zero starting state: Newton momentum m₀ and the base slots (numpy, full n)."""
    rng = np.random.default_rng(seed)
    m0 = rng.standard_normal(N)
    slots = {"sgd": {}, "momentum": {"buf": rng.standard_normal(N)},
             "nesterov": {"buf": rng.standard_normal(N)},
             "adam": {"m": rng.standard_normal(N) * 0.1, "v": rng.uniform(0.1, 1.0, N)}}[name]
    return m0, slots


def gradients(seed=3):
    return np.random.default_rng(seed).standard_normal((STEPS, N))


def numpy_step(name, g, v, eta, mom, slots, t):
    """One FOSI step on full vectors; returns (δ, new momentum, new slots)."""
    a_g, a_m = RULES[name].newton_coefficients
    g1 = v.T @ (v @ g)
    g2 = g - g1
    mom = a_g * g1 + a_m * mom
    e = v @ mom
    u, slots = numpy_base(name, g2, slots, LR * C_SCALE, t, beta=BETA, b1=B1, b2=B2, eps=EPS)
    delta = u - v.T @ (v @ u) - ALPHA * v.T @ (eta * e)
    return delta, mom, slots


def numpy_run(name, vs, etas, grads):
    """The reference over STEPS steps; V switches to vs[1] half way. δ, m and slots per step."""
    mom, slots = initial(name)
    out = []
    for t, g in enumerate(grads, start=1):
        j = 0 if t <= STEPS // 2 else 1
        delta, mom, slots = numpy_step(name, g, vs[j], etas[j], mom, slots, t)
        out.append((delta, mom.copy(), {k: s.copy() for k, s in slots.items()}))
    return out


class Runner:
    """hybrid_displacement over the same steps, on shard ``layout`` (the whole vector with
    P = 1), with the state kept as the optimizer keeps it between steps."""

    def __init__(self, name, layout, comm, in_place=False):
        self.rule, self.layout, self.comm = RULES[name], layout, comm
        m0, slots = initial(name)
        self.m0 = self.local(m0)
        self.slots = [tf.Variable(self.local(slots[k])) for k in ("m", "v")] if name == "adam" \
            else [self.local(slots["buf"])] if self.rule.linear_buffer else []
        if in_place and self.rule.linear_buffer:      # the fused kernel updates B in place
            self.slots = [tf.Variable(self.slots[0])]
        self.out = tf.Variable(tf.zeros_like(self.m0)) if in_place else None
        self.coeffs, self.decay = tf.zeros(K, tf.float64), tf.constant(1.0, tf.float64)
        self.q = tf.zeros(K, tf.float64)
        self.cached = tf.zeros(K * (1 + self.rule.linear_buffer), tf.float64)
        self.fresh = tf.constant(False)

    def local(self, x):
        return self.layout.local(tf.constant(x, tf.float64))

    def set_basis(self, v, eta):
        """A new V: fold the K coordinates back into the vectors first (what the optimizer's
        materialize_momentum does before a refresh)."""
        if hasattr(self, "v_r"):
            self.m0 = materialize(self.m0, self.coeffs, self.v_r, self.decay)
            self.coeffs, self.decay = tf.zeros(K, tf.float64), tf.constant(1.0, tf.float64)
            if self.rule.linear_buffer:
                folded = materialize(self.slot_tensors()[0], -self.q, self.v_r)
                if isinstance(self.slots[0], tf.Variable):
                    self.slots[0].assign(folded)
                else:
                    self.slots = [folded]
                self.q = tf.zeros(K, tf.float64)
            self.fresh = tf.constant(False)
        self.v_r = tf.transpose(self.layout.local(tf.constant(v.T, tf.float64)))
        self.curvature = CurvatureSubspace(self.v_r, tf.constant(v @ v.T), tf.constant(eta),
                                           tf.constant(C_SCALE, tf.float64))

    def slot_tensors(self):
        return [s.value() if isinstance(s, tf.Variable) else s for s in self.slots]

    def step(self, g, t):
        adam_vars = self.rule.name == "adam"
        slots = self.slot_tensors()
        state = StepState(self.m0, self.coeffs, self.decay,
                          [] if self.out is not None and adam_vars else slots,
                          self.q, self.cached, self.fresh)
        in_place = None
        if self.out is not None:
            def in_place(g2, lr, init):
                if not adam_vars:
                    return self.rule.apply_linear_in_place(self.out, self.slots, g2, lr, init)
                return self.rule.apply_in_place(self.out, self.slots, g2, lr, tf.constant(t))
        res = hybrid_displacement(self.local(g), state, self.curvature, self.rule,
                                  tf.constant(LR, tf.float64), ALPHA, tf.constant(t), self.comm,
                                  in_place=in_place)
        assert bool(res.gradient_finite) and bool(res.finite)
        np.testing.assert_allclose(float(res.grad_sq_norm), np.sum(np.square(g)), rtol=1e-12)
        self.coeffs, self.decay, self.q = res.momentum_coeffs, res.momentum_decay, res.slot_coeffs
        self.cached, self.fresh = res.cached, tf.constant(True)
        if adam_vars and self.out is None:
            for var, value in zip(self.slots, res.slots_r):
                var.assign(value)
        elif not adam_vars and self.out is None:
            self.slots = res.slots_r
        return res.delta_r

    def momentum(self):
        return materialize(self.m0, self.coeffs, self.v_r, self.decay).numpy()

    def slot_values(self):
        if self.rule.name == "adam":
            return {"m": self.slots[0].numpy(), "v": self.slots[1].numpy()}
        if self.rule.linear_buffer:
            return {"buf": materialize(self.slot_tensors()[0], -self.q, self.v_r).numpy()}
        return {}


def run(name, layout, comm, vs, etas, grads, in_place=False):
    runner = Runner(name, layout, comm, in_place)
    out = []
    for t, g in enumerate(grads, start=1):
        if t in (1, STEPS // 2 + 1):
            j = 0 if t == 1 else 1
            runner.set_basis(vs[j], etas[j])
        delta = runner.step(g, t).numpy()
        out.append((delta, runner.momentum(), runner.slot_values()))
    return out


def case():
    return (basis(1), basis(2)), (rates(4), rates(5)), gradients()


@pytest.mark.parametrize("name,in_place", [(name, flag) for name in RULES
                                           for flag in (False, True)])
def test_hybrid_step_matches_numpy_fosi_across_a_change_of_basis(name, in_place):
    vs, etas, grads = case()
    want = numpy_run(name, vs, etas, grads)
    got = run(name, ShardLayout(N, 1, 0), LocalComm(), vs, etas, grads, in_place)
    for t, ((d, m, s), (d_ref, m_ref, s_ref)) in enumerate(zip(got, want), start=1):
        np.testing.assert_allclose(d, d_ref, rtol=1e-10, atol=1e-12, err_msg=f"δ, step {t}")
        np.testing.assert_allclose(m, m_ref, rtol=1e-10, atol=1e-12, err_msg=f"m, step {t}")
        assert sorted(s) == sorted(s_ref)
        for key in s:
            np.testing.assert_allclose(s[key], s_ref[key], rtol=1e-10, atol=1e-12,
                                       err_msg=f"{key}, step {t}")
    # The Newton part moved the weights within span(V) and the base part outside it.
    assert np.max(np.abs(vs[0] @ want[0][0])) > 1e-3


@pytest.mark.parametrize("p", [2, 3])
@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adam"])
def test_shards_of_v_over_p_ranks_give_the_unsharded_step(name, p):
    """V G = Σ_r V_r G_r: with V, G and the state split over P ranks (n = 13 not divisible by
    P, padded), the concatenated δ_r equal the one-process δ."""
    vs, etas, grads = case()
    want = numpy_run(name, vs, etas, grads)
    per_rank = run_on_ranks(p, lambda comm: run(name, ShardLayout(N, p, comm.rank), comm, vs,
                                                etas, grads, in_place=True))
    for t in range(STEPS):
        delta = np.concatenate([steps[t][0] for steps in per_rank])
        assert np.all(delta[N:] == 0.0)                 # padding entries never move
        np.testing.assert_allclose(delta[:N], want[t][0], rtol=1e-10, atol=1e-12,
                                   err_msg=f"δ, step {t + 1}")
        momentum = np.concatenate([steps[t][1] for steps in per_rank])[:N]
        np.testing.assert_allclose(momentum, want[t][1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["momentum", "nesterov"])
def test_a_stale_cache_is_recomputed_not_used(name):
    """fresh=False: [V m₀ ; V B] come from the vectors, whatever ``cached`` holds."""
    vs, etas, grads = case()
    runner = Runner(name, ShardLayout(N, 1, 0), LocalComm())
    runner.set_basis(vs[0], etas[0])
    for t in (1, 2):
        runner.step(grads[t - 1], t)
    outcomes = []
    for cached, fresh in ((runner.cached, True), (tf.fill(runner.cached.shape,
                                                          np.float64(np.nan)), False)):
        state = StepState(runner.m0, runner.coeffs, runner.decay, runner.slots, runner.q,
                          cached, tf.constant(fresh))
        res = hybrid_displacement(tf.constant(grads[2]), state, runner.curvature, runner.rule,
                                  tf.constant(LR, tf.float64), ALPHA, tf.constant(3),
                                  LocalComm())
        outcomes.append((res.delta_r.numpy(), res.cached.numpy()))
    np.testing.assert_allclose(outcomes[1][0], outcomes[0][0], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(outcomes[1][1], outcomes[0][1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adam"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_gradient_is_reported_and_reaches_delta(name, bad, in_place):
    """NaN/Inf in Ḡ: ``finite`` is False with no pass over δ (‖Ḡ‖² is not finite); out of
    place the NaN reaches δ, and in place the fused kernel does not run (slots untouched)."""
    vs, etas, grads = case()
    runner = Runner(name, ShardLayout(N, 1, 0), LocalComm(), in_place=in_place)
    runner.set_basis(vs[0], etas[0])
    before = [np.array(s).copy() for s in runner.slot_tensors()]
    g = grads[0].copy()
    g[5] = bad
    state = StepState(runner.m0, runner.coeffs, runner.decay,
                      [] if in_place and name == "adam" else runner.slot_tensors(), runner.q,
                      runner.cached, runner.fresh)

    def apply(g2, lr, init):
        if name != "adam":
            return runner.rule.apply_linear_in_place(runner.out, runner.slots, g2, lr, init)
        return runner.rule.apply_in_place(runner.out, runner.slots, g2, lr, tf.constant(1))

    res = hybrid_displacement(tf.constant(g), state, runner.curvature, runner.rule,
                              tf.constant(LR, tf.float64), ALPHA, tf.constant(1), LocalComm(),
                              in_place=apply if in_place else None)
    assert not bool(res.gradient_finite) and not bool(res.finite)
    assert not np.isfinite(float(res.grad_sq_norm))
    assert not bool(all_finite(res.delta_r))
    for slot, old in zip(runner.slot_tensors(), before):     # the kernel did not run
        np.testing.assert_array_equal(np.array(slot), old)


def test_a_non_finite_newton_term_marks_the_step_not_finite():
    """A finite gradient, but a K-vector of the step that is not (an infinite rate η_0):
    ``finite`` is False, though δ was never summed."""
    vs, etas, grads = case()
    runner = Runner("momentum", ShardLayout(N, 1, 0), LocalComm(), in_place=True)
    eta = etas[0].copy()
    eta[0] = np.inf
    runner.set_basis(vs[0], eta)
    state = StepState(runner.m0, runner.coeffs, runner.decay, runner.slot_tensors(), runner.q,
                      runner.cached, runner.fresh)
    res = hybrid_displacement(tf.constant(grads[0]), state, runner.curvature, runner.rule,
                              tf.constant(LR, tf.float64), ALPHA, tf.constant(1), LocalComm())
    assert bool(res.gradient_finite) and not bool(res.finite)


def test_materialize_is_scale_times_x_plus_v_transpose_coeffs():
    rng = np.random.default_rng(0)
    v, x, c = rng.standard_normal((K, N)), rng.standard_normal(N), rng.standard_normal(K)
    for scale in (1.0, 0.25, tf.constant(-1.5, tf.float64)):
        got = materialize(tf.constant(x), tf.constant(c), tf.constant(v), scale).numpy()
        np.testing.assert_allclose(got, float(scale) * x + v.T @ c, rtol=1e-12)


def numpy_rates(lam, valid, damping, ell, c_max):
    shifted = lam + damping
    ok = valid & (shifted != 0)
    eta = np.where(ok, np.abs(1.0 / np.where(ok, shifted, 1.0)), 0.0)
    scale = np.clip(eta[ell] / eta[-1], 1.0, c_max) if eta[ell] > 0 and eta[-1] > 0 else 1.0
    return eta, scale


@pytest.mark.parametrize("lam,valid,damping,ell,c_max", [
    ([-2.0, 0.5, 1.0, 4.0], [True] * 4, 0.0, 1, 3.0),        # c = (1/0.5)/(1/4) = 8 → 3
    ([-2.0, 0.5, 1.0, 4.0], [True] * 4, 0.5, 1, 10.0),       # c = 4.5 unclipped
    ([-0.5, 2.0, 2.5, 3.0], [True] * 4, 0.5, 1, 3.0),        # λ + σ = 0: rate 0
    ([0.1, 0.2, 0.3], [True, True, False], 0.0, 0, 3.0),     # top invalid: c = 1
    ([0.1, 0.2, 0.3], [False, True, True], 0.0, 1, 3.0),
    ([5.0, 6.0], [True, True], 0.0, 0, 1.0),                 # Adam's c_max = 1
])
def test_newton_rates_and_scale_against_numpy(lam, valid, damping, ell, c_max):
    lam, valid = np.array(lam), np.array(valid)
    eta, scale = newton_rates(tf.constant(lam), tf.constant(valid), damping, ell, c_max)
    eta_ref, scale_ref = numpy_rates(lam, valid, damping, ell, c_max)
    np.testing.assert_allclose(eta.numpy(), eta_ref, rtol=1e-12)
    assert float(scale) == pytest.approx(scale_ref, rel=1e-12)


@pytest.mark.parametrize("warmup", [0, 1, 2, 5])
@pytest.mark.parametrize("every", [1, 3, 8])
def test_refresh_schedule_counts_fosi_triggers(warmup, every):
    """Refresh before update t iff t+1 ≥ W and (t+1−W) mod T = 0 (FOSI §3); with W = 0 the
    trigger of t = −1 is taken before update 0 (so a run starts with a refresh)."""
    triggers = [max(t, 0) for t in range(-1, 60)
                if t + 1 >= warmup and (t + 1 - warmup) % every == 0]
    for t in range(60):
        assert refresh_count_due(t, warmup, every) == sum(1 for s in triggers if s <= t)
    for r in range(5):
        assert next_refresh_step(r, warmup, every) == triggers[r]
