"""The outer rules of dho2_tf/distributed/outer_rules.py against numpy: the window jump and one
round of consensus ADMM, on P simulated ranks (tests/helpers/ranks.py) and with LocalComm."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from dho2_tf.distributed.outer_rules import consensus_round, window_jump
from dho2_tf.distributed.comm import CountingComm, LocalComm
from tests.helpers.ranks import run_on_ranks


def test_window_jump_function_algebra():
    theta_start, theta_end = np.array([1.0, 2.0]), np.array([1.5, 1.0])
    v_prev = np.array([0.25, -0.5])
    new_theta, v = window_jump(tf.constant(theta_end), tf.constant(theta_start),
                               tf.constant(v_prev))
    np.testing.assert_allclose(v.numpy(), v_prev + theta_end - theta_start)
    np.testing.assert_allclose(new_theta.numpy(), theta_end + v_prev + theta_end - theta_start)


def test_window_jumps_accumulate_the_window_displacements():
    """v_j = Σ_{i≤j} D_i and θ ← θ_end + v_j, over several windows (numpy recursion)."""
    rng = np.random.default_rng(5)
    start, v = rng.standard_normal(6), np.zeros(6)
    displacements = []
    for _ in range(4):
        end = start + rng.standard_normal(6)                  # the window's own steps
        displacements.append(end - start)
        new_theta, v_t = window_jump(tf.constant(end), tf.constant(start), tf.constant(v))
        v = v_t.numpy()
        np.testing.assert_allclose(v, np.sum(displacements, axis=0), rtol=1e-12)
        np.testing.assert_allclose(new_theta.numpy(), end + np.sum(displacements, axis=0),
                                   rtol=1e-12)
        start = new_theta.numpy()


def numpy_round(xs, duals, z_old, rho):
    """Scaled consensus ADMM z- and dual-update (Boyd et al. 2011 §7.1), in numpy."""
    z = np.mean(xs + duals / rho, axis=0)
    new_duals = duals + rho * (xs - z)
    primal = np.sqrt(np.sum((xs - z) ** 2))
    dual_res = rho * np.sqrt(len(xs)) * np.linalg.norm(z - z_old)
    return z, new_duals, primal, dual_res


@pytest.mark.parametrize("p", [2, 3, 4])
@pytest.mark.parametrize("rho", [0.25, 2.0])      # exact in float32 (rho is cast through it)
def test_consensus_round_on_p_ranks_matches_numpy(p, rho):
    rng = np.random.default_rng(10 * p)
    n = 7
    xs = rng.standard_normal((p, n))
    duals = rng.standard_normal((p, n))
    duals -= duals.mean(0)                           # Σ_i π_i = 0, as after every round
    z_old = rng.standard_normal(n)
    z, new_duals, primal, dual_res = numpy_round(xs, duals, z_old, rho)

    def rank(comm):
        counting = CountingComm(comm)
        r = comm.rank
        out = consensus_round(tf.constant(xs[r]), tf.constant(duals[r]), tf.constant(z_old),
                              rho, counting)
        return out, counting.calls

    results = run_on_ranks(p, rank)
    for r, (out, calls) in enumerate(results):
        assert [(kind, name) for kind, name, _ in calls] == [("allreduce", "dho2/admm/consensus")]
        assert calls[0][2] == (n + 1) * 8                 # x + π/ρ and ‖x‖² in one collective
        np.testing.assert_allclose(out.z.numpy(), z, rtol=1e-12)
        np.testing.assert_allclose(out.dual.numpy(), new_duals[r], rtol=1e-12, atol=1e-14)
        assert float(out.primal_residual) == pytest.approx(primal, rel=1e-9)
        assert float(out.dual_residual) == pytest.approx(dual_res, rel=1e-12)
    # The invariant the one-collective primal residual relies on is kept: Σ_i π_i stays 0.
    np.testing.assert_allclose(sum(out.dual.numpy() for out, _ in results), 0.0, atol=1e-12)


def test_consensus_rounds_reach_the_average_of_fixed_local_iterates():
    """With the x_i held fixed, z is their mean after one round and the duals then stop."""
    xs = np.random.default_rng(1).standard_normal((3, 4))

    def rank(comm):
        x = tf.constant(xs[comm.rank])
        dual, z = tf.zeros(4, tf.float64), tf.zeros(4, tf.float64)
        history = []
        for _ in range(3):
            out = consensus_round(x, dual, z, 0.5, comm)
            dual, z = out.dual, out.z
            history.append((z.numpy(), float(out.primal_residual), float(out.dual_residual)))
        return history

    want_primal = np.sqrt(np.sum((xs - xs.mean(0)) ** 2))
    for history in run_on_ranks(3, rank):
        for j, (z, primal, dual_res) in enumerate(history):
            np.testing.assert_allclose(z, xs.mean(0), rtol=1e-12)
            assert primal == pytest.approx(want_primal, rel=1e-9)
            if j > 0:
                assert dual_res == pytest.approx(0.0, abs=1e-12)


def test_consensus_round_with_one_rank_keeps_z_equal_to_x():
    x = tf.constant([1.0, -2.0, 0.5], tf.float64)
    out = consensus_round(x, tf.zeros(3, tf.float64), tf.constant([0.0, 0.0, 1.0], tf.float64),
                          0.3, LocalComm())
    np.testing.assert_allclose(out.z.numpy(), x.numpy())
    np.testing.assert_allclose(out.dual.numpy(), 0.0)
    assert float(out.primal_residual) == pytest.approx(0.0, abs=1e-7)
    assert float(out.dual_residual) == pytest.approx(0.3 * np.linalg.norm([1.0, -2.0, -0.5]))
