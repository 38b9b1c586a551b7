"""PrioritizedSampler: validation, config, initial pass, refresh, selection (algorithm.md §9)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from dho2_tf.distributed.comm import LocalComm
from dho2_tf.prioritized import PrioritizedSampler, per_example
from tests.helpers import prioritized as helpers


def bound_sampler(n: int = 200, **kwargs) -> tuple[PrioritizedSampler, tf.keras.Model]:
    model = helpers.mlp()
    x, y = helpers.classification_data(n)
    sampler = PrioritizedSampler.paper(**kwargs)
    sampler.bind(model, helpers.SCCE, x, y, LocalComm())
    return sampler, model


@pytest.mark.parametrize("kwargs, message", [
    ({"k": 0.0}, r"`k` must be a fraction in \(0, 1\]. Received: k=0.0"),
    ({"k": 1.5}, r"`k` must be a fraction in \(0, 1\]. Received: k=1.5"),
    ({"r": 0}, r"`r` must be a fraction in \(0, 1\]. Received: r=0"),
    ({"r": -0.1}, r"`r` must be a fraction in \(0, 1\]. Received: r=-0.1"),
    ({"priority": "norm"}, r"`priority` must be one of \('length', 'projection', 'loss'\). "
                           r"Received: priority='norm'"),
    ({"init_priority": "grad"}, r"`init_priority` must be one of .* Received: init_priority="),
    ({"estimator": "linear"}, r"`estimator` must be one of .* Received: estimator='linear'"),
    ({"selection": "random"}, r"`selection` must be one of \('topk', 'importance', 'global', "
                              r"'adaptive', 'pool'\)"),
    ({"gamma": 0.0}, r"`gamma` must be a fraction in \(0, 1\]. Received: gamma=0.0"),
    ({"theta_e": 2.0}, r"`theta_e` must be a fraction in \(0, 1\]. Received: theta_e=2.0"),
    ({"chunk_size": 0}, r"`chunk_size` must be a positive integer. Received: chunk_size=0"),
    ({"max_weight": -1.0}, r"`max_weight` must be None or a positive number"),
    ({"gbar_update": "sum"}, r"`gbar_update` must be one of \('ema', 'as_released'\)"),
    ({"per_example": "pfor"}, r"`per_example` must be one of \('exact', 'last_layer', 'auto'\)"),
])
def test_bad_parameters_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PrioritizedSampler(**kwargs)


def test_too_small_shard_for_k_raises_on_bind():
    with pytest.raises(ValueError, match=r"`k` selects 0 of the shard's 10 examples"):
        bound_sampler(n=10, k=0.05)


def test_use_before_bind_is_a_runtime_error():
    with pytest.raises(RuntimeError, match="call `bind"):
        PrioritizedSampler().initialize()


@pytest.mark.parametrize("kwargs", [
    {},
    {"k": 0.02, "r": 0.03, "priority": "length", "estimator": "keep", "selection": "importance",
     "gamma": 0.3, "max_weight": 4.0, "seed": 7},
    {"selection": "global", "aggregate_report": True, "gbar_update": "as_released",
     "refresh": "pass", "bookkeeping_interval": 3, "cost_ratio": 2.5,
     "per_example": "last_layer", "chunk_size": 64, "init_priority": "projection"},
])
def test_config_round_trip(kwargs):
    config = PrioritizedSampler(**kwargs).get_config()
    assert PrioritizedSampler.from_config(config).get_config() == config
    restored = tf.keras.utils.deserialize_keras_object(
        tf.keras.utils.serialize_keras_object(PrioritizedSampler(**kwargs)))
    assert restored.get_config() == config


def test_explinear_alias_is_stored_canonically():
    assert PrioritizedSampler(estimator="explinear").get_config()["estimator"] == "exp-decay"


@pytest.mark.parametrize("priority, per_example_kind",
                         [("length", "exact"), ("loss", "exact"), ("length", "last_layer")])
def test_topk_picks_exactly_the_nonzero_loss_subset(priority, per_example_kind):
    # Linear regression with exact targets for 95% of the points: only 5% have non-zero loss.
    rng = np.random.default_rng(0)
    n = 400
    x = rng.normal(size=(n, 6)).astype(np.float32)
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([tf.keras.Input((6,)), tf.keras.layers.Dense(1)])
    y = model(x).numpy()
    hard = rng.choice(n, size=n // 20, replace=False)
    y[hard] += rng.choice([-1.0, 1.0], size=(len(hard), 1)) * rng.uniform(0.5, 2, (len(hard), 1))
    sampler = PrioritizedSampler.paper(k=0.05, r=0.01, priority=priority, init_priority=priority,
                                 per_example=per_example_kind)
    sampler.bind(model, "mse", x, y, LocalComm())
    sampler.initialize()
    idx, weights = sampler.select()
    assert set(idx.numpy()) == set(hard)
    np.testing.assert_allclose(weights.numpy(), np.full(20, 1 / 20), rtol=1e-6)


def test_importance_sampling_is_unbiased():
    # Mean over 2,000 sampled batches of Σ w_i g_i vs the full-shard mean gradient, in 3 SE.
    sampler, model = bound_sampler(n=300, k=0.05, r=0.01, priority="length",
                                   init_priority="length", selection="importance", seed=11)
    sampler.initialize()
    loss_fn = per_example.per_example_loss_fn(helpers.SCCE)
    grads, _ = per_example.per_example_gradients(model, loss_fn, sampler.x, sampler.y)
    g = helpers.flat_gradients(grads).astype(np.float64)  # [n, P]
    full = g.mean(axis=0)
    select = tf.function(sampler.select)
    estimates = []
    for _ in range(2000):
        idx, weights = select()
        estimates.append(weights.numpy() @ g[idx.numpy()])
    estimates = np.array(estimates)
    directions = np.vstack([full, np.random.default_rng(5).normal(size=(3, g.shape[1]))])
    projected = estimates @ directions.T  # [2000, 4]
    se = projected.std(axis=0, ddof=1) / np.sqrt(len(projected))
    z = (projected.mean(axis=0) - directions @ full) / se
    assert np.all(np.abs(z) < 3), z
    # The same weights through a weighted-loss tape give Σ w_i g_i.
    idx, weights = select()
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(weights * loss_fn(tf.gather(sampler.y, idx),
                                               model(tf.gather(sampler.x, idx))))
    tape_grad = helpers.flat_gradients([t[None] for t in
                                        tape.gradient(loss, model.trainable_variables)])[0]
    np.testing.assert_allclose(tape_grad, weights.numpy() @ g[idx.numpy()], rtol=1e-4, atol=1e-6)


def test_initial_pass_sets_length_priorities_and_mean_gradient():
    sampler, model = bound_sampler(n=100, chunk_size=32)  # the last chunk wraps around
    sampler.initialize()
    loss_fn = per_example.per_example_loss_fn(helpers.SCCE)
    g = helpers.flat_gradients(helpers.loop_gradients(model, loss_fn, sampler.x.numpy(),
                                                      sampler.y.numpy()))
    np.testing.assert_allclose(sampler.prio.numpy(), np.sum(g * g, 1), rtol=1e-5)
    np.testing.assert_allclose(helpers.flat_gradients([v.numpy()[None] for v in sampler.gbar])[0],
                               g.mean(0), rtol=1e-4, atol=1e-7)
    assert int(sampler.step.numpy()) == 1 and int(sampler.evaluations.numpy()) == 100


def test_refresh_covers_every_point_once_per_cycle_and_updates_gbar():
    sampler, _ = bound_sampler(n=100, r=0.07, priority="projection", estimator="keep")
    sampler.initialize()
    gbar0 = [v.numpy() for v in sampler.gbar]
    refresh = tf.function(sampler.refresh)
    seen = []
    for _ in range(-(-100 // 7)):  # ⌈n/R⌉ iterations
        seen.extend(refresh().numpy())
        sampler.advance()
    assert set(seen) == set(range(100))
    assert len(seen) - len(set(seen)) == 15 * 7 - 100  # only the wrap-around repeats
    assert not np.allclose(gbar0[0], sampler.gbar[0].numpy())
    assert set(np.nonzero(sampler.prio_t.numpy() > 0)[0]) == set(range(100))


def test_evaluation_counter_counts_refresh_and_selection():
    sampler, _ = bound_sampler(n=200, k=0.05, r=0.02, aggregate_report=True)
    sampler.initialize()
    refreshed = sampler.refresh()
    idx, weights = sampler.select()
    x, _, w = sampler.training_batch(idx, weights, refreshed)
    assert int(sampler.evaluations.numpy()) == 200 + 4 + 10 + 4
    assert x.shape[0] == 14
    np.testing.assert_allclose(w.numpy(), [0.1] * 10 + [0.25] * 4, rtol=1e-6)


def test_priority_table_is_checkpointed(tmp_path):
    sampler, _ = bound_sampler(n=100)
    sampler.initialize()
    path = tf.train.Checkpoint(sampler=sampler).write(str(tmp_path / "ckpt"))
    saved = sampler.prio.numpy().copy()
    sampler.prio.assign(tf.zeros_like(sampler.prio))
    tf.train.Checkpoint(sampler=sampler).read(path).assert_existing_objects_matched()
    np.testing.assert_array_equal(sampler.prio.numpy(), saved)
