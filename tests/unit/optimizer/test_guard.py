"""The step's divergence guard (dho2_tf/guard.py): its equations against numpy, and an injected
curvature jump (a wrong c installed right after a refresh) caught on an explicit quadratic."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from dho2_tf import DHO2, LocalComm
from dho2_tf.guard import ALPHA_FACTORS, GUARD_DECAY, guard_decision
from tests.unit.optimizer.quadratic import quadratic_model, random_spd

N = 12


def numpy_guard(sq_norms, refreshes, scale, alpha, factor):
    """The module docstring's equations, step by step: (c, α, level, tripped) per step."""
    mu = ref = 0.0
    level = window = 0
    out = []
    for s, r in zip(sq_norms, refreshes):
        if r != window:
            if level > 0:
                ref, mu = min(ref, mu), 0.0
            else:
                ref = mu
            level, window = 0, r
        mu = GUARD_DECAY * mu + (1 - GUARD_DECAY) * s if mu > 0 else s
        if ref <= 0:
            ref = mu
        ratio = mu / ref if r > 0 else 0.0
        new = max(level, int(ratio > factor) + int(ratio > factor ** 2))
        out.append((1.0 if new else scale, alpha * ALPHA_FACTORS[new], new, new > level))
        level = new
    return out


def test_guard_decision_follows_its_equations():
    """A slow rise to level 1, then level 2; at the next refresh the level resets, the old
    reference is kept and the average restarts (no immediate re-trip), then a third trip."""
    sq = [1.0, 1.0, 1.0, 1.0, 1.2, 3.0, 6.0, 9.0, 12.0, 30.0, 200.0, 1.0, 1.0, 9.0, 40.0,
          40.0]
    refreshes = [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2]
    want = numpy_guard(sq, refreshes, scale=3.0, alpha=0.1, factor=2.0)
    average = reference = tf.constant(0.0, tf.float64)
    level = window = tf.constant(0, tf.int64)
    got = []
    for s, r in zip(sq, refreshes):
        d = guard_decision(tf.constant(s, tf.float64), average, reference, level, window,
                           tf.constant(r, tf.int64), tf.constant(3.0, tf.float64), 0.1, 2.0)
        average, reference, level, window = d.average, d.reference, d.level, d.window
        got.append((float(d.scale), float(d.alpha), int(d.level), bool(d.tripped)))
    for t, (g, w) in enumerate(zip(got, want)):
        assert g[2:] == w[2:], f"step {t}: {g} != {w}"
        np.testing.assert_allclose(g[:2], w[:2], rtol=1e-12, err_msg=f"step {t}")
    levels = [w[2] for w in want]
    assert levels[:7] == [0] * 7 and levels[7] == 1 and levels[9] == 2
    assert levels[11:14] == [0, 0, 0] and levels[14] == 2
    assert sum(w[3] for w in want) == 3        # 0 → 1, 1 → 2, and 0 → 2 after the refresh


def run_quadratic(guard=1.5, steps=60, wrong_scale=40.0, base="sgd", refresh_every=1000):
    """DHO2 on f = ½θᵀAθ − bᵀθ (λ in [0.3, 6], lr 0.1: stable for the base), with c ←
    ``wrong_scale`` installed after the first refresh (before update 4; ``None``: no
    injection). Returns the optimizer and the optimality gap f − f* before each update."""
    eig = np.linspace(0.3, 6.0, N)
    a = random_spd(N, eig, seed=2)
    rng = np.random.default_rng(1)
    b, theta0 = rng.standard_normal(N), rng.standard_normal(N)
    model, loss_fn, batch = quadratic_model(a, b, theta0)
    opt = DHO2(learning_rate=0.1, base=base, k=2, alpha=0.3, refresh_every=refresh_every,
               warmup=5, guard=guard, comm=LocalComm())
    opt.bind(model, loss_fn, batch)
    theta = model.trainable_variables[0]
    f_star = float(-0.5 * b @ np.linalg.solve(a, b))
    gaps = []
    for _ in range(steps):
        before = opt.refresh_index()
        opt.on_step_begin()
        if opt.refresh_index() == 1 > before and wrong_scale is not None:
            opt.state.scale.assign(wrong_scale)     # the injected curvature jump
        with tf.GradientTape() as tape:
            loss = loss_fn(batch[1], model(batch[0]))
        grads = tape.gradient(loss, [theta])
        opt.apply_gradients(zip(grads, [theta]))
        gaps.append(float(loss) - f_star)
    return opt, np.array(gaps)


def test_injected_curvature_jump_is_caught_and_training_continues():
    opt, gaps = run_quadratic(guard=1.5)
    metrics = opt.curvature_metrics()
    assert metrics["guard_trips"] >= 1 and metrics["guard_level"] >= 1
    assert metrics["guard_trips"] == float(opt.state.guard_trips.numpy())
    assert metrics["skipped_steps"] == 0.0
    # The wrong c made the loss climb, the guard restored the base step, and the run converges.
    assert np.max(gaps[4:15]) > 2 * gaps[3]
    assert gaps[-1] < 1e-3 * gaps[0]
    # Without the guard the same jump diverges.
    _, unguarded = run_quadratic(guard=0)
    assert not np.isfinite(unguarded[-1]) or unguarded[-1] > 1e6 * gaps[0]


def test_guard_does_not_trip_on_a_healthy_run():
    """The estimated c (no injection), heavy ball, four refreshes: no trip, FOSI throughout."""
    opt, gaps = run_quadratic(steps=40, wrong_scale=None, base="momentum", refresh_every=10)
    assert opt.refresh_index() == 4
    assert opt.curvature_metrics()["guard_trips"] == 0.0
    assert gaps[-1] < 0.02 * gaps[0]


@pytest.mark.parametrize("value", [1.0, 0.5, -2.0, "4", True, float("inf")])
def test_bad_guard_settings_are_rejected(value):
    with pytest.raises(ValueError, match="guard"):
        DHO2(guard=value)


def test_guard_zero_turns_it_off():
    assert DHO2(guard=0).hp.guard == 0.0 and DHO2(guard=False).get_config()["guard"] == 0.0
