"""Light steps while sampling is uniform: bookkeeping every N-th step, decision τ̄ > max(τ_th, ĉ)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from dho2_tf.distributed.comm import LocalComm
from dho2_tf.prioritized import PrioritizedModel, PrioritizedSampler
from tests.helpers import prioritized as helpers

N, K, INTERVAL, EPOCHS = 200, 20, 4, 3
STEPS = EPOCHS * N // K  # ⌈n/K⌉ = 10 steps per epoch


def linear_model() -> tf.keras.Model:
    tf.keras.utils.set_random_seed(0)
    return tf.keras.Sequential([tf.keras.Input((8,)), tf.keras.layers.Dense(3)])


def uniform_data() -> tuple[np.ndarray, np.ndarray]:
    """N copies of one example: every τ is 1, so sampling stays uniform."""
    return np.tile(helpers.classification_data(1)[0], (N, 1)), np.zeros(N, np.int32)


def skewed_data() -> tuple[np.ndarray, np.ndarray]:
    """10% of the examples have ~30x larger inputs, so ~30x larger gradients."""
    x, y = helpers.classification_data(N)
    x[:20] *= 30.0
    return x, y


def fitted(x: np.ndarray, y: np.ndarray, **kwargs) -> PrioritizedSampler:
    sampler = PrioritizedSampler(k=K / N, bookkeeping_interval=INTERVAL, seed=1, **kwargs)
    pmodel = PrioritizedModel(linear_model(), sampler, comm=LocalComm())
    pmodel.compile(optimizer=tf.keras.optimizers.SGD(0.05), loss=helpers.SCCE)
    pmodel.fit(x, y, epochs=EPOCHS, verbose=0)
    assert int(sampler.step.numpy()) == 1 + STEPS
    return sampler


def test_uniform_sampling_does_the_bookkeeping_every_nth_step_only():
    sampler = fitted(*uniform_data())
    assert not bool(sampler.importance_on.numpy())
    full_steps = [t for t in range(1, STEPS + 1) if t % INTERVAL == 0]  # 4, 8, ..., 28
    assert int(sampler.bookkeeping_steps.numpy()) == len(full_steps) == 7
    np.testing.assert_array_equal(sampler.step_counts.numpy(),
                                  [STEPS - len(full_steps), len(full_steps)])
    stamps = set(np.unique(sampler.prio_t.numpy())) - {0}  # 0: the initial pass
    assert stamps <= set(full_steps) and max(full_steps) in stamps
    assert int(sampler.evaluations.numpy()) == N + STEPS * K
    assert np.all(sampler.step_seconds.numpy() > 0.0)  # both kinds of step were timed


def test_importance_sampling_keeps_one_light_step_in_n():
    sampler = fitted(*skewed_data(), cost_ratio=1.0)
    assert bool(sampler.importance_on.numpy())
    light = [t for t in range(1, STEPS + 1) if t % INTERVAL == 1]  # 1, 5, ..., 29
    np.testing.assert_array_equal(sampler.step_counts.numpy(),
                                  [len(light), STEPS - len(light)])
    assert int(sampler.bookkeeping_steps.numpy()) == STEPS - len(light) == 22


def test_interval_one_does_the_bookkeeping_every_step():
    x, y = uniform_data()
    sampler = PrioritizedSampler(k=K / N, bookkeeping_interval=1)
    pmodel = PrioritizedModel(linear_model(), sampler, comm=LocalComm())
    pmodel.compile(optimizer=tf.keras.optimizers.SGD(0.05), loss=helpers.SCCE)
    pmodel.fit(x, y, epochs=1, verbose=0)
    assert int(sampler.bookkeeping_steps.numpy()) == N // K
    np.testing.assert_array_equal(sampler.step_counts.numpy(), [0, N // K])
    assert float(sampler.cost.numpy()) == 1.0  # no light step: ĉ is not measured


def test_a_large_cost_ratio_keeps_sampling_uniform():
    """τ̄ passes τ_th on the skewed data, but not ĉ = 1000: no importance step is taken."""
    sampler = fitted(*skewed_data(), cost_ratio=1000.0)
    assert float(sampler.tau_ema.numpy()) > sampler.tau_threshold
    assert not bool(sampler.importance_on.numpy())
    assert float(sampler.cost.numpy()) == 1000.0
    assert int(sampler.bookkeeping_steps.numpy()) == STEPS // INTERVAL  # uniform schedule


def test_measured_cost_ratio_is_the_ratio_of_mean_step_times():
    """ĉ = T̄_full / T̄_light from the recorded step times, and the decision τ̄ > max(τ_th, ĉ)."""
    x, y = skewed_data()
    sampler = PrioritizedSampler(k=K / N, r=0.05, refresh="pass", per_example="exact")
    sampler.bind(linear_model(), helpers.SCCE, x, y, LocalComm())
    sampler.initialize()
    tau_ema = float(sampler.tau_ema.numpy())
    assert float(sampler.cost.numpy()) == 1.0  # no step timed yet
    assert tau_ema > 2.0 * sampler.tau_threshold  # the table's τ stays the same below
    light = 0.001
    for ratio, want_on in ((0.5 * tau_ema, True), (2.0 * tau_ema, False)):
        sampler.step_seconds.assign([2 * light, 3 * ratio * light])  # means: light, ratio·light
        sampler.step_counts.assign([2.0, 3.0])
        sampler.select()  # refresh="pass": the adaptive rule decides on each selection
        cost = float(sampler.cost.numpy())
        np.testing.assert_allclose(cost, ratio, rtol=1e-5)
        assert bool(sampler.importance_on.numpy()) == (
            float(sampler.tau_ema.numpy()) > max(sampler.tau_threshold, cost)) == want_on


def test_measured_cost_decides_during_fit():
    sampler = fitted(*skewed_data())
    cost = float(sampler.cost.numpy())
    assert cost > 0.0 and cost != 1.0  # both kinds of step had been timed
    assert bool(sampler.importance_on.numpy()) == (
        float(sampler.tau_ema.numpy()) > max(sampler.tau_threshold, cost))
