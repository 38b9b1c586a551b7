"""``selection="adaptive"``: importance sampling only while its variance reduction τ pays."""

from __future__ import annotations

import glob
import os

import numpy as np
import tensorflow as tf

from dho2_tf.distributed.comm import LocalComm
from dho2_tf.training.monitoring import TensorBoardMonitor
from dho2_tf.prioritized import PrioritizedModel, PrioritizedSampler, selection, switch
from tests.helpers import prioritized as helpers

N = 200


def numpy_tau(s: np.ndarray, q: np.ndarray) -> float:
    """V(u)/V(q) without the common ‖ḡ‖² term: n Σ s² / Σ s²/q."""
    return len(s) * np.sum(s ** 2) / np.sum(s ** 2 / q)


def test_tau_matches_numpy_and_is_one_for_equal_norms():
    rng = np.random.default_rng(0)
    p_hat = rng.gamma(0.5, size=N).astype(np.float32)
    for use_sqrt in (True, False):
        q = selection.importance_proposal(tf.constant(p_hat), 0.1, use_sqrt).numpy()
        s = np.sqrt(p_hat) if use_sqrt else p_hat
        tau = switch.tau_from_terms(switch.variance_terms(tf.constant(p_hat), q, use_sqrt))
        np.testing.assert_allclose(float(tau), numpy_tau(s, q), rtol=1e-5)
        assert float(tau) > 1.0
    equal = tf.fill([N], 3.0)
    q = selection.importance_proposal(equal, 0.1, True)
    np.testing.assert_allclose(float(switch.tau_from_terms(
        switch.variance_terms(equal, q, True))), 1.0, rtol=1e-6)


def test_batch_estimate_is_exact_on_the_whole_shard_and_matches_numpy():
    rng = np.random.default_rng(1)
    s = rng.gamma(0.5, size=N).astype(np.float32)
    gamma = 0.1
    q = selection.importance_proposal(tf.constant(s ** 2), gamma, True).numpy()
    whole = switch.sample_variance_terms(tf.constant(s), tf.fill([N], 1.0 / N), gamma).numpy()
    table = switch.variance_terms(tf.constant(s ** 2), q, True).numpy()
    np.testing.assert_allclose(whole, table, rtol=1e-5)
    draws = rng.integers(0, N, size=30)
    w = (1.0 / (30 * N * q[draws])).astype(np.float32)
    got = switch.sample_variance_terms(tf.constant(s[draws]), tf.constant(w), gamma).numpy()
    mean_s = np.sum(w * s[draws])
    n_q = (1 - gamma) * s[draws] / mean_s + gamma
    np.testing.assert_allclose(got, [np.sum(w * s[draws] ** 2),
                                     np.sum(w * s[draws] ** 2 / n_q)], rtol=1e-5)


def linear_model(d: int = 8, classes: int = 3) -> tf.keras.Model:
    """Softmax regression: the last-layer gradient is the whole gradient, ‖g_i‖ ∝ ‖(x_i, 1)‖."""
    tf.keras.utils.set_random_seed(0)
    return tf.keras.Sequential([tf.keras.Input((d,)), tf.keras.layers.Dense(classes)])


def adaptive_model(x: np.ndarray, y: np.ndarray, log_dir: str | None = None,
                   cost_ratio: float | str = 1.0) -> PrioritizedModel:
    """The recommended sampler; ĉ fixed at 1 by default so that τ̄ alone decides."""
    sampler = PrioritizedSampler.recommended(k=0.1, r=0.05, seed=1, cost_ratio=cost_ratio)
    pmodel = PrioritizedModel(linear_model(), sampler, comm=LocalComm())
    pmodel.compile(optimizer=tf.keras.optimizers.SGD(0.05), loss=helpers.SCCE)
    callbacks = [TensorBoardMonitor(log_dir, comm=LocalComm(), update_freq=1)] if log_dir else []
    pmodel.fit(x, y, epochs=2, verbose=0, callbacks=callbacks)
    return pmodel


def test_uniform_data_stays_uniform(tmp_path):
    x = np.tile(helpers.classification_data(1)[0], (N, 1))  # N copies of one example
    y = np.zeros(N, np.int32)
    pmodel = adaptive_model(x, y, str(tmp_path))
    sampler = pmodel.sampler
    np.testing.assert_allclose(float(sampler.tau.numpy()), 1.0, rtol=1e-5)
    assert not bool(sampler.importance_on.numpy())
    _, weights = sampler.select()
    np.testing.assert_allclose(weights.numpy(), np.full(20, 1 / 20), rtol=1e-6)
    decisions = event_values(tmp_path, "priority/importance_on")  # logged every step
    assert len(decisions) >= 20 and set(decisions) == {0.0}


def test_skewed_gradients_switch_importance_on(tmp_path):
    x, y = helpers.classification_data(N)
    x[:20] *= 30.0  # 10% of the examples have ~30x larger gradients
    pmodel = adaptive_model(x, y, str(tmp_path))
    sampler = pmodel.sampler
    assert bool(sampler.importance_on.numpy())
    assert float(sampler.tau_ema.numpy()) > sampler.tau_threshold
    _, weights = sampler.select()
    assert np.ptp(weights.numpy()) > 0.0  # importance weights, not uniform 1/K
    logged = event_values(tmp_path, "priority/importance_on")
    assert logged and logged[-1] == 1.0


def test_initial_tau_uses_explicit_gradient_norms():
    x, y = helpers.classification_data(N)
    x[:20] *= 30.0
    model = linear_model()
    sampler = PrioritizedSampler.recommended(k=0.1, r=0.05)
    sampler.bind(model, helpers.SCCE, x, y, LocalComm())
    sampler.initialize()
    grads = helpers.flat_gradients(helpers.loop_gradients(model, sampler.loss_fn, x, y))
    s = np.linalg.norm(grads, axis=1)
    gamma = sampler.gamma   # the recommended uniform floor γ
    q = (1.0 - gamma) * s / s.sum() + gamma / N
    np.testing.assert_allclose(float(sampler.tau_ema.numpy()), numpy_tau(s, q), rtol=1e-4)
    assert bool(sampler.importance_on.numpy()) == (numpy_tau(s, q) > 1.5)
    assert numpy_tau(s, q) > 1.5


def event_values(log_dir, tag: str) -> list[float]:
    """Every value of the scalar ``tag`` in the event files of ``log_dir``, in step order."""
    values = []
    for path in sorted(glob.glob(os.path.join(str(log_dir), "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            values += [(event.step, float(tf.make_ndarray(v.tensor)))
                       for v in event.summary.value if v.tag == tag]
    return [value for _, value in sorted(values)]
