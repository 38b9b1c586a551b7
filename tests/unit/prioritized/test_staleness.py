"""Staleness estimators (docs/algorithm.md §9.4, §9.9 property 2)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from dho2_tf.prioritized import staleness
from dho2_tf.prioritized.staleness import PriorityTable


def numpy_refresh(p, t, a, idx, p_new, step, theta):
    """Reference exp-linear update, one example at a time (the released code's loop)."""
    p, t, a = p.copy(), t.copy(), a.copy()
    for i, value in zip(idx, p_new):
        if t[i] == step:
            continue
        ratio = value / p[i] if p[i] != 0 else 0.0
        log_ratio = np.log(ratio) if (p[i] != 0 and ratio > 0) else 0.0
        a[i] = theta * log_ratio / (step - t[i]) + (1 - theta) * a[i]
        p[i], t[i] = value, step
    return p, t, a


def make_table(p, t, a) -> PriorityTable:
    return PriorityTable(tf.constant(p, tf.float32), tf.constant(t, tf.int32),
                         tf.constant(a, tf.float32))


def test_exp_decay_update_matches_numpy_reference_with_edge_cases():
    # zero priority, sign change, same-step refresh (no-op), negative priorities, plain decay
    p = np.array([0.0, 2.0, 3.0, -1.0, 4.0, 5.0], np.float32)
    t = np.array([0, 0, 3, 1, 1, 0], np.int32)
    a = np.array([0.1, 0.2, 0.3, -0.1, 0.0, 0.5], np.float32)
    idx = np.array([0, 1, 2, 3, 4])
    p_new = np.array([1.0, -2.0, 9.0, -0.5, 1.0], np.float32)
    got = staleness.refresh_priorities(make_table(p, t, a), idx, p_new, 3, "exp-decay", 0.8)
    want = numpy_refresh(p, t, a, idx, p_new, 3, 0.8)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-6)
    assert got.p.numpy()[2] == 3.0 and got.t.numpy()[2] == 3  # same step: nothing changes
    assert got.a.numpy()[5] == 0.5  # not refreshed


def test_exp_decay_prediction_and_keep():
    table = make_table([2.0, -1.0], [1, 2], [-0.5, 0.25])
    got = staleness.estimate_priorities(table, tf.constant(5), "exp-decay").numpy()
    np.testing.assert_allclose(got, [2.0 * np.exp(-2.0), -1.0 * np.exp(0.75)], rtol=1e-6)
    np.testing.assert_array_equal(staleness.estimate_priorities(table, 5, "keep").numpy(),
                                  [2.0, -1.0])
    kept = staleness.refresh_priorities(table, [1], [7.0], 2, "keep")
    np.testing.assert_array_equal(kept.p.numpy(), [2.0, 7.0])
    np.testing.assert_array_equal(kept.a.numpy(), table.a.numpy())


@pytest.mark.parametrize("every", [1, 3, 10])
def test_exp_decay_fits_decay_rate_of_synthetic_trajectories(every):
    # p_i(t) = p0_i·exp(−λ_i t), refreshed every `every` steps: a_i → −λ_i geometrically (0.2^m).
    rates = np.array([0.0, 0.01, 0.05, 0.2, -0.03], np.float32)  # the last one grows
    p0 = np.array([1.0, 5.0, 0.3, 2.0, 1.5], np.float32)
    table = make_table(p0, np.zeros(5), np.zeros(5))
    for step in range(every, 15 * every + 1, every):
        table = staleness.refresh_priorities(
            table, np.arange(5), p0 * np.exp(-rates * step), step, "explinear", 0.8)
    np.testing.assert_allclose(table.a.numpy(), -rates, atol=1e-6)
    future = staleness.estimate_priorities(table, 15 * every + 7, "exp-decay").numpy()
    np.testing.assert_allclose(future, p0 * np.exp(-rates * (15 * every + 7)), rtol=1e-4)


def test_exp_decay_fit_is_an_ema_under_noise():
    # Noisy log-linear trajectory: the fitted rate is close to the true one on average.
    rng = np.random.default_rng(0)
    n, rate = 2000, 0.05
    p0 = rng.uniform(1, 2, n).astype(np.float32)
    table = make_table(p0, np.zeros(n), np.zeros(n))
    for step in range(5, 101, 5):
        noisy = p0 * np.exp(-rate * step + rng.normal(0, 0.05, n))
        table = staleness.refresh_priorities(table, np.arange(n), noisy, step, "exp-decay")
    assert abs(float(np.mean(table.a.numpy())) + rate) < 2e-3


@pytest.mark.parametrize("alias", ["explinear", "exp-linear", "EXP-DECAY"])
def test_aliases_resolve_to_exp_decay(alias):
    assert staleness.canonical_estimator(alias) == "exp-decay"


def test_unknown_estimator_is_a_value_error():
    with pytest.raises(ValueError, match=r"`estimator` must be one of \('keep', 'exp-decay'\).*"
                                         r"Received: estimator='quadratic'"):
        staleness.canonical_estimator("quadratic")
