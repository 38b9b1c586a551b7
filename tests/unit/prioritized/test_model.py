"""PrioritizedModel: Keras fit with any optimizer (docs/algorithm.md §9.5, §9.9 property 5)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from dho2_tf.distributed.comm import LocalComm
from dho2_tf.prioritized import PrioritizedModel, PrioritizedSampler
from tests.helpers import prioritized as helpers


def wrapped(sampler: PrioritizedSampler, optimizer=None, **kwargs) -> PrioritizedModel:
    pmodel = PrioritizedModel(helpers.mlp(), sampler, comm=LocalComm(), **kwargs)
    pmodel.compile(optimizer=optimizer or tf.keras.optimizers.SGD(0.1), loss=helpers.SCCE,
                   metrics=["accuracy"])
    return pmodel


def full_batch_step(model: tf.keras.Model, x, y, lr: float) -> list[np.ndarray]:
    with tf.GradientTape() as tape:
        loss = helpers.SCCE(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    return [(v - lr * g).numpy() for v, g in zip(model.trainable_variables, grads)]


def test_k_one_step_equals_full_batch_gradient_descent():
    x, y = helpers.classification_data(100)
    pmodel = wrapped(PrioritizedSampler.paper(k=1.0, r=0.01, estimator="keep"))
    expected = full_batch_step(helpers.mlp(), x, y, 0.1)  # same seed, same initial weights
    pmodel.fit(x, y, steps_per_epoch=1, verbose=0)
    for got, want in zip(pmodel.model.trainable_variables, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_aggregate_report_step_adds_the_refresh_mean():
    x, y = helpers.classification_data(100)
    pmodel = wrapped(PrioritizedSampler.paper(k=1.0, r=0.1, estimator="keep", aggregate_report=True))
    reference = helpers.mlp()
    with tf.GradientTape() as tape:
        loss = helpers.SCCE(y, reference(x)) + helpers.SCCE(y[:10], reference(x[:10]))
    grads = tape.gradient(loss, reference.trainable_variables)
    pmodel.fit(x, y, steps_per_epoch=1, verbose=0)
    for got, v, g in zip(pmodel.model.trainable_variables, reference.trainable_variables, grads):
        np.testing.assert_allclose(got.numpy(), (v - 0.1 * g).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sampler_kwargs, optimizer", [
    ({}, tf.keras.optimizers.SGD),
    ({"selection": "importance", "priority": "length"}, tf.keras.optimizers.Adam),
    ({"selection": "global", "per_example": "last_layer", "estimator": "keep"},
     tf.keras.optimizers.SGD),
])
def test_fit_trains_with_any_optimizer(sampler_kwargs, optimizer):
    x, y = helpers.classification_data(400)
    pmodel = wrapped(PrioritizedSampler.paper(k=0.1, r=0.02, **sampler_kwargs), optimizer(0.05))
    before = pmodel.evaluate(x, y, verbose=0)[0]
    history = pmodel.fit(x, y, epochs=3, verbose=0, validation_data=(x, y))
    assert history.history["val_loss"][-1] < before
    assert int(pmodel.sampler.step.numpy()) == 1 + 3 * 10  # ⌈n/K⌉ = 10 steps per epoch
    pmodel.fit(epochs=1, verbose=0)  # continues on the bound shard
    assert int(pmodel.sampler.step.numpy()) == 41


def test_fit_argument_errors():
    x, y = helpers.classification_data(100)
    pmodel = PrioritizedModel(helpers.mlp(), comm=LocalComm())
    with pytest.raises(RuntimeError, match="Call `compile"):
        pmodel.fit(x, y)
    pmodel.compile(optimizer="sgd", loss=helpers.SCCE)
    with pytest.raises(ValueError, match="`batch_size` must be None.*Received: batch_size=32"):
        pmodel.fit(x, y, batch_size=32)
    with pytest.raises(ValueError, match="must be indexable arrays"):
        pmodel.fit(tf.data.Dataset.from_tensor_slices((x, y)))
    with pytest.raises(RuntimeError, match=r"The first `fit` call needs this rank's shard"):
        pmodel.fit()
    with pytest.raises(ValueError, match="`sampler` must be a PrioritizedSampler"):
        PrioritizedModel(helpers.mlp(), sampler="topk")


def test_model_config_round_trip():
    pmodel = PrioritizedModel(helpers.mlp(), PrioritizedSampler(k=0.2, selection="importance"),
                              average_gradients=False, name="psgd")
    config = pmodel.get_config()
    restored = PrioritizedModel.from_config(config)
    assert restored.get_config() == config
    assert restored.sampler.get_config() == pmodel.sampler.get_config()


def test_weights_with_priority_table_save_and_load(tmp_path):
    x, y = helpers.classification_data(200)
    pmodel = wrapped(PrioritizedSampler(k=0.1, r=0.05))
    pmodel.fit(x, y, epochs=1, verbose=0)
    pmodel.save_weights(str(tmp_path / "w"))
    other = wrapped(PrioritizedSampler(k=0.1, r=0.05))
    other.sampler.bind(other.model, helpers.SCCE, x, y, LocalComm())
    other.load_weights(str(tmp_path / "w"))
    for a, b in zip(pmodel.model.weights, other.model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(pmodel.sampler.prio.numpy(), other.sampler.prio.numpy())
    pmodel.model.save(tmp_path / "inner.keras")  # the trained model saves on its own
    loaded = tf.keras.models.load_model(tmp_path / "inner.keras")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), pmodel.predict(x, verbose=0))


def test_priority_table_is_not_among_the_broadcast_variables():
    # Weight broadcasts (Horovod's callback, DHO2) use `model.variables`: the per-rank table
    # must not be there, but it must be in checkpoints (see the save/load test).
    x, y = helpers.classification_data(100)
    pmodel = wrapped(PrioritizedSampler(k=0.1, r=0.05))
    pmodel.fit(x, y, epochs=1, verbose=0)
    assert {v.ref() for v in pmodel.variables} == {v.ref() for v in pmodel.model.variables}


class CommOptimizer(tf.keras.optimizers.SGD):
    """An optimizer that communicates (and averages gradients) itself, like dho2_tf.DHO2."""

    comm = LocalComm()


def test_gradient_averaging_is_automatic_unless_the_optimizer_has_a_comm():
    pmodel = wrapped(PrioritizedSampler())
    assert pmodel._should_average()
    pmodel.compile(optimizer=CommOptimizer(0.1), loss=helpers.SCCE)
    assert not pmodel._should_average()
    assert wrapped(PrioritizedSampler(), average_gradients=True)._should_average()
