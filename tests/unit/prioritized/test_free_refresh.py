"""``refresh="free"``: priorities from the training step's own forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from dho2_tf.distributed.comm import LocalComm
from dho2_tf.prioritized import PrioritizedModel, PrioritizedSampler
from tests.helpers import prioritized as helpers

N, K = 200, 20


def one_free_step(**kwargs) -> tuple[PrioritizedModel, dict]:
    """Initial pass + step 1, then the state before step 2, then step 2 (free refresh)."""
    x, y = helpers.classification_data(N)
    sampler = PrioritizedSampler.paper(k=K / N, r=0.05, refresh="free", **kwargs)
    pmodel = PrioritizedModel(helpers.mlp(), sampler, comm=LocalComm())
    pmodel.compile(optimizer=tf.keras.optimizers.SGD(0.1), loss=helpers.SCCE)
    pmodel.fit(x, y, epochs=1, steps_per_epoch=1, verbose=0)
    before = {"weights": pmodel.model.get_weights(), "p": sampler.prio.numpy(),
              "t": sampler.prio_t.numpy(), "a": sampler.prio_a.numpy(),
              "gbar": [g.numpy() for g in sampler.gbar], "p_hat":
              sampler.estimated_priorities().numpy(), "x": x, "y": y}
    pmodel.fit(epochs=1, steps_per_epoch=1, verbose=0)
    return pmodel, before


def separate_refresh(before: dict, **kwargs) -> PrioritizedSampler:
    """The paper's refresh pass over the whole shard (r = 1) at step 2, on the same weights."""
    model = helpers.mlp()
    model.set_weights(before["weights"])
    reference = PrioritizedSampler.paper(k=K / N, r=1.0, refresh="pass", **kwargs)
    reference.bind(model, helpers.SCCE, before["x"], before["y"], LocalComm())
    reference.prio.assign(before["p"])
    reference.prio_t.assign(before["t"])
    reference.prio_a.assign(before["a"])
    for g, value in zip(reference.gbar, before["gbar"]):
        g.assign(value)
    reference.step.assign(2)
    reference.refresh()
    return reference


@pytest.mark.parametrize("kwargs", [
    {"priority": "length", "per_example": "last_layer", "estimator": "exp-decay"},
    {"priority": "projection", "per_example": "last_layer", "estimator": "exp-decay"},
    {"priority": "loss", "init_priority": "loss", "estimator": "keep"},  # loss-only scorer
])
def test_free_refresh_equals_a_separate_refresh_on_the_same_weights(kwargs):
    pmodel, before = one_free_step(selection="topk", **kwargs)
    sampler = pmodel.sampler
    top = set(np.argsort(-before["p_hat"], kind="stable")[:K])  # step 2's top-k selection
    stamped = set(np.flatnonzero(sampler.prio_t.numpy() == 2))
    assert stamped == top
    reference = separate_refresh(before, **kwargs)
    rows = sorted(top)
    others = sorted(set(range(N)) - top)
    np.testing.assert_array_equal(sampler.prio_t.numpy()[rows], reference.prio_t.numpy()[rows])
    np.testing.assert_allclose(sampler.prio.numpy()[rows], reference.prio.numpy()[rows],
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sampler.prio_a.numpy()[rows], reference.prio_a.numpy()[rows],
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(sampler.prio.numpy()[others], before["p"][others])
    np.testing.assert_array_equal(sampler.prio_t.numpy()[others], before["t"][others])
    assert int(sampler.evaluations.numpy()) == N + 2 * K  # initial pass, no refresh pass


def test_free_length_priorities_and_gbar_match_explicit_last_layer_gradients():
    pmodel, before = one_free_step(selection="topk", priority="length",
                                   per_example="last_layer", estimator="keep")
    sampler = pmodel.sampler
    rows = np.flatnonzero(sampler.prio_t.numpy() == 2)
    model = helpers.mlp()
    model.set_weights(before["weights"])
    grads = helpers.loop_gradients(model, sampler.loss_fn, before["x"][rows],
                                   before["y"][rows])[-2:]  # last Dense kernel and bias
    flat = helpers.flat_gradients(grads)
    np.testing.assert_allclose(sampler.prio.numpy()[rows], np.sum(flat ** 2, axis=1),
                               rtol=1e-5)
    f = K / N  # ḡ ← (1 − f)·ḡ + f·(mean gradient of the K selected examples)
    for g_new, g_old, g_i in zip(sampler.gbar, before["gbar"], grads):
        np.testing.assert_allclose(g_new.numpy(), (1 - f) * g_old + f * g_i.mean(axis=0),
                                   rtol=1e-5, atol=1e-7)


def test_importance_draws_with_repeats_store_each_example_once():
    pmodel, before = one_free_step(selection="importance", priority="length",
                                   per_example="last_layer", estimator="keep")
    sampler = pmodel.sampler
    rows = np.flatnonzero(sampler.prio_t.numpy() == 2)
    assert 0 < len(rows) <= K
    reference = separate_refresh(before, selection="importance", priority="length",
                                 per_example="last_layer", estimator="keep")
    np.testing.assert_allclose(sampler.prio.numpy()[rows], reference.prio.numpy()[rows],
                               rtol=1e-5)


def test_free_refresh_trains_and_skips_the_pass():
    x, y = helpers.classification_data(N)
    sampler = PrioritizedSampler.recommended(k=0.1, r=0.05)
    pmodel = PrioritizedModel(helpers.mlp(), sampler, comm=LocalComm())
    pmodel.compile(optimizer=tf.keras.optimizers.SGD(0.1), loss=helpers.SCCE)
    before = float(pmodel.evaluate(x, y, verbose=0))
    pmodel.fit(x, y, epochs=3, verbose=0)
    assert float(pmodel.evaluate(x, y, verbose=0)) < before
    assert int(sampler.cursor.numpy()) == 0  # the round robin never ran
    assert int(sampler.evaluations.numpy()) == N + 3 * 10 * 20


def test_default_model_sampler_is_adaptive_with_free_refresh():
    pmodel = PrioritizedModel(helpers.mlp(), comm=LocalComm())
    config = pmodel.sampler.get_config()
    assert (config["selection"], config["refresh"], config["gamma"]) == ("adaptive", "free", 0.5)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"refresh": "every"}, ValueError, r"`refresh` must be one of \('pass', 'free'\)"),
    ({"refresh": "free", "aggregate_report": True}, ValueError, r"`aggregate_report` trains"),
    ({"pool": 0.5}, ValueError, r"`pool` must be a number ≥ 1. Received: pool=0.5"),
    ({"tau_threshold": 0.9}, ValueError, r"`tau_threshold` must be a number ≥ 1"),
    ({"tau_momentum": 1.0}, ValueError, r"`tau_momentum` must be in \[0, 1\)"),
    ({"bookkeeping_interval": 0}, ValueError,
     r"`bookkeeping_interval` must be a positive integer. Received: bookkeeping_interval=0"),
    ({"cost_ratio": "timed"}, ValueError,
     r"`cost_ratio` must be 'measured' or a number > 0. Received: cost_ratio='timed'"),
    ({"cost_ratio": 0.0}, ValueError, r"`cost_ratio` must be .* Received: cost_ratio=0.0"),
])
def test_bad_new_options_raise(kwargs, error, message):
    with pytest.raises(error, match=message):
        PrioritizedSampler(**kwargs)


def test_free_refresh_needs_a_closed_form_scorer():
    x, y = helpers.classification_data(N)
    sampler = PrioritizedSampler(k=0.1, refresh="free", per_example="exact")
    with pytest.raises(ValueError, match=r"`refresh='free'` takes gradients .* "
                                         r"Received: per_example='exact'"):
        sampler.bind(helpers.mlp(), helpers.SCCE, x, y, LocalComm())
    cnn_x = np.random.default_rng(0).normal(size=(N, 16)).astype(np.float32)
    auto = PrioritizedSampler(k=0.1, refresh="free", per_example="auto")
    auto.bind(helpers.cnn(), helpers.SCCE, cnn_x, y, LocalComm())  # ends in Dense: last layer
    assert type(auto.scorer).__name__ == "LastLayerScorer"


def test_pool_selection_takes_the_largest_losses_of_the_pool():
    x, y = helpers.classification_data(N)
    sampler = PrioritizedSampler(k=0.05, selection="pool", pool=4.0, priority="loss",
                                 init_priority="loss", refresh="free", seed=3)
    model = helpers.mlp()
    sampler.bind(model, helpers.SCCE, x, y, LocalComm())
    sampler.initialize()
    idx, weights = sampler.select()
    pool = np.flatnonzero(sampler.prio_t.numpy() == 1)  # the pool's losses were stored at t = 1
    assert len(pool) == sampler.pool_size == 40
    losses = sampler.loss_fn(y, model(x, training=False)).numpy()
    want = pool[np.argsort(-losses[pool], kind="stable")[:10]]
    assert set(idx.numpy()) == set(want)
    np.testing.assert_allclose(weights.numpy(), np.full(10, 0.1))
