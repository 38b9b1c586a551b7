"""Model zoo: registry, parameter counts, one training step, errors and serialization."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from dho2_tf import models
from dho2_tf.models.resnet import ZeroPadShortcut

# name -> (input shape used for the count, exact total parameters).
# MLP 40→100→100→10: 40·100+100 + 100·100+100 + 100·10+10 = 15,210.
# Logistic regression 784→10: 784·10+10 = 7,850.
# Autoencoder 784-512-128-32-128-512-784: (784·512+512) + (512·128+128) + (128·32+32)
#   + (32·128+128) + (128·512+512) + (512·784+784)
#   = 401,920 + 65,664 + 4,128 + 4,224 + 66,048 + 402,192 = 944,176 (FOSI's 0.94M).
# Small CNN on 28×28: conv 5·5·1·16+16 = 416, conv 5·5·16·32+32 = 12,832, two pools leave
#   7·7·32 = 1,568 features, Dense 1,568·10+10 = 15,690: 28,938.
EXPECTED_PARAMS = {
    "cnn": ((784,), 28_938),
    "logreg": ((784,), 7_850),
    "autoencoder": ((784,), 944_176),
    "mlp": ((40,), 15_210),
    "resnet20": ((32, 32, 3), 271_098),
    "resnet32": ((32, 32, 3), 466_426),
    "resnet56": ((32, 32, 3), 857_082),
    "resnet110": ((32, 32, 3), 1_736_058),
    "resnet1d": ((40,), 40_470),
}
# He et al. 2016, Table 6: ResNet-20 has 0.27M and ResNet-110 1.7M parameters.
PAPER_RANGES = {"resnet20": (260_000, 280_000), "resnet110": (1_690_000, 1_750_000),
                "autoencoder": (935_000, 945_000)}
# Small inputs for the training step (ResNet counts do not depend on H, W: global pooling).
TRAIN_SHAPES = {"mlp": (40,), "resnet1d": (40,), "logreg": (40,), "autoencoder": (40,),
                "cnn": (40,)}
# Tracing fit's graph of the deep nets takes ~10 s on 2 cores; they run the step eagerly.
EAGER_FIT = {"resnet56", "resnet110"}


def test_registry_lists_builtin_models():
    assert models.available() == sorted(EXPECTED_PARAMS)


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_parameter_count_matches_architecture(name):
    shape, expected = EXPECTED_PARAMS[name]
    count = models.get(name, shape, 10).count_params()
    assert count == expected
    low, high = PAPER_RANGES.get(name, (count, count))
    assert low <= count <= high


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_one_fit_step_gives_finite_loss(name):
    shape = TRAIN_SHAPES.get(name, (4, 4, 3))
    model = models.get(name, shape, 10)
    objective = models.objective(name)
    model.compile(optimizer=tf.keras.optimizers.SGD(0.01), loss=objective.make_loss(),
                  metrics=list(objective.metrics), run_eagerly=name in EAGER_FIT)
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(4, *shape)).astype(np.float32)
    y = objective.targets(x, rng.integers(0, 10, size=4).astype(np.int32))
    before = [w.copy() for w in model.get_weights()]
    history = model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    loss = history.history["loss"][0]
    assert np.isfinite(loss) and loss > 0
    assert model(x[:1]).shape == ((1, *shape) if objective.targets_are_inputs else (1, 10))
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def test_mlp_is_reference_architecture():
    model = models.mlp((40,), 10)
    dense = [layer for layer in model.layers if isinstance(layer, tf.keras.layers.Dense)]
    assert [layer.units for layer in dense] == [100, 100, 10]
    assert [layer.activation.__name__ for layer in dense] == ["relu", "relu", "linear"]


def test_mlp_flattens_image_input():
    model = models.mlp((8, 8, 1), 10, hidden=(32,))
    assert model.count_params() == 64 * 32 + 32 + 32 * 10 + 10
    assert model(tf.zeros([2, 8, 8, 1])).shape == (2, 10)


def test_weight_decay_is_half_l2_penalty():
    # SGD weight decay λ adds λ·w to the gradient, i.e. (λ/2)·‖w‖² to the loss.
    model = models.mlp((40,), 10, weight_decay=1e-2)
    kernels = [layer.kernel for layer in model.layers if isinstance(layer, tf.keras.layers.Dense)]
    expected = 0.5e-2 * sum(float(tf.reduce_sum(k ** 2)) for k in kernels)
    np.testing.assert_allclose(float(tf.add_n(model.losses)), expected, rtol=1e-5)
    assert models.mlp((40,), 10).losses == []


def test_resnet_weight_decay_covers_every_conv_and_dense_kernel():
    model = models.resnet(8, (8, 8, 3), 10, weight_decay=1e-4)
    kernels = [layer for layer in model.layers
               if isinstance(layer, (tf.keras.layers.Conv2D, tf.keras.layers.Dense))]
    assert len(model.losses) == len(kernels) == 1 + 6 + 1


def test_zero_pad_shortcut_subsamples_and_pads_channels():
    x = tf.reshape(tf.range(1, 33, dtype=tf.float32), [1, 4, 4, 2])
    out = ZeroPadShortcut(filters=4, strides=2)(x).numpy()
    assert out.shape == (1, 2, 2, 4)
    np.testing.assert_array_equal(out[..., 1:3], x.numpy()[:, ::2, ::2, :])
    np.testing.assert_array_equal(out[..., [0, 3]], 0.0)
    seq = tf.ones([2, 5, 3])
    assert ZeroPadShortcut(filters=6, strides=2)(seq).shape == (2, 3, 6)


def test_resnet_downsamples_twice():
    model = models.resnet20((32, 32, 3), 10)
    assert model.get_layer("stage1_block3_out").output.shape[1:] == (32, 32, 16)
    assert model.get_layer("stage3_block3_out").output.shape[1:] == (8, 8, 64)
    assert len([layer for layer in model.layers if isinstance(layer, tf.keras.layers.Conv2D)]) \
        == 19


def test_model_config_round_trip():
    model = models.resnet1d((40,), 10)
    config = model.get_config()
    clone = tf.keras.Model.from_config(config)
    assert clone.get_config() == config
    clone.set_weights(model.get_weights())
    x = np.random.default_rng(1).normal(size=(3, 40)).astype(np.float32)
    np.testing.assert_allclose(clone(x, training=False), model(x, training=False), atol=1e-6)


def test_compiled_model_saves_and_loads(tmp_path):
    model = models.get("resnet1d", (40,), 10, width=4)
    model.compile(optimizer="adam",
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = tf.keras.models.load_model(path)
    x = np.random.default_rng(2).normal(size=(3, 40)).astype(np.float32)
    np.testing.assert_allclose(loaded(x, training=False), model(x, training=False), atol=1e-6)


def test_get_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        models.get("vgg16", (32, 32, 3), 10)
    message = str(err.value)
    assert "Received: name='vgg16'" in message
    assert all(name in message for name in EXPECTED_PARAMS)


@pytest.mark.parametrize("depth", [21, 2, 0])
def test_resnet_bad_depth(depth):
    with pytest.raises(ValueError, match=rf"`depth` must satisfy depth = 6n\+2.*"
                                         rf"Received: depth={depth}$"):
        models.resnet(depth, (32, 32, 3), 10)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: models.resnet1d(depth=9), "Received: depth=9"),
    (lambda: models.resnet1d(width=0), "`width` must be a positive integer. Received: width=0"),
    (lambda: models.mlp((40,), 1),
     "`num_classes` must be an integer >= 2. Received: num_classes=1"),
    (lambda: models.mlp((40,), 10, hidden=(0,)), "Received: hidden=(0,)"),
    (lambda: models.mlp((40,), 10, weight_decay=-1.0), "Received: weight_decay=-1.0"),
    (lambda: models.resnet(20, (32, 32), 10), "Received: input_shape=(32, 32)"),
])
def test_builder_validation_messages(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert message in str(err.value)


def test_get_passes_kwargs_and_rejects_unknown_ones():
    assert models.get("mlp", (40,), 10, hidden=(7,)).count_params() == 40 * 7 + 7 + 7 * 10 + 10
    with pytest.raises(TypeError):
        models.get("mlp", (40,), 10, depth=3)


def test_register_adds_builder_and_refuses_duplicates(monkeypatch):
    monkeypatch.setattr(models.registry, "_BUILDERS", dict(models.registry._BUILDERS))

    def linear(input_shape, num_classes):
        return models.mlp(input_shape, num_classes, hidden=())

    models.register("linear", linear)
    assert "linear" in models.available()
    assert models.get("linear", (40,), 10).count_params() == 410
    with pytest.raises(ValueError, match="'linear' is already registered"):
        models.register("linear", linear)
    models.register("linear", linear, overwrite=True)
    with pytest.raises(ValueError, match="`name` must be a non-empty string"):
        models.register("", linear)


# ------------------------------------------------------------------------- FOSI's MNIST tasks


def test_logistic_regression_is_exactly_softmax_of_an_affine_map():
    model = models.get("logreg", (784,), 10)
    assert [type(layer).__name__ for layer in model.layers] == ["Dense"]
    rng = np.random.default_rng(3)
    w = rng.normal(size=(784, 10)).astype(np.float32) * 0.05
    b = rng.normal(size=10).astype(np.float32)
    model.set_weights([w, b])
    x = rng.uniform(size=(5, 784)).astype(np.float32)
    logits = x.astype(np.float64) @ w + b
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(tf.nn.softmax(model(x)).numpy(), expected, rtol=1e-5, atol=1e-7)
    assert models.objective("logreg") is models.CLASSIFICATION


def test_logistic_regression_l2_is_optional_and_on_the_weights_only():
    assert models.logistic_regression((784,), 10).losses == []
    model = models.logistic_regression((784,), 10, weight_decay=1e-2)
    kernel = model.get_layer("logits").kernel
    np.testing.assert_allclose(float(tf.add_n(model.losses)),
                               0.5e-2 * float(tf.reduce_sum(kernel ** 2)), rtol=1e-5)


def test_autoencoder_layout_output_shape_and_objective():
    model = models.get("autoencoder", (784,), 10)
    dense = [layer for layer in model.layers if isinstance(layer, tf.keras.layers.Dense)]
    assert [layer.units for layer in dense] == [512, 128, 32, 128, 512, 784]
    assert [layer.activation.__name__ for layer in dense] == ["tanh"] * 5 + ["linear"]
    assert model(tf.zeros([3, 784])).shape == (3, 784)
    objective = models.objective("autoencoder")
    assert objective is models.RECONSTRUCTION and not objective.has_accuracy
    x = np.random.default_rng(4).uniform(size=(2, 784)).astype(np.float32)
    assert objective.targets(x, np.array([1, 2])) is x
    z = np.random.default_rng(5).normal(size=(2, 784)).astype(np.float32)
    p = 1.0 / (1.0 + np.exp(-z.astype(np.float64)))
    expected = np.mean(-x * np.log(p) - (1 - x) * np.log(1 - p))
    np.testing.assert_allclose(float(objective.make_loss()(x, z)), expected, rtol=1e-5)


def test_autoencoder_widths_and_image_input():
    model = models.autoencoder((8, 8, 1), hidden=(16, 4, 16))
    assert model.count_params() == (64 * 16 + 16) + (16 * 4 + 4) + (4 * 16 + 16) + (16 * 64 + 64)
    assert model(tf.zeros([2, 8, 8, 1])).shape == (2, 8, 8, 1)
    assert models.autoencoder((784,), None).count_params() == 944_176


@pytest.mark.parametrize(("call", "message"), [
    (lambda: models.autoencoder((784,), hidden=()), "`hidden` must be a non-empty sequence"),
    (lambda: models.autoencoder((784,), 1), "`num_classes` must be an integer >= 2"),
    (lambda: models.logistic_regression((784,), 10, weight_decay=-1.0),
     "Received: weight_decay=-1.0"),
])
def test_mnist_task_builder_validation(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_register_with_an_objective(monkeypatch):
    monkeypatch.setattr(models.registry, "_BUILDERS", dict(models.registry._BUILDERS))
    monkeypatch.setattr(models.registry, "_OBJECTIVES", dict(models.registry._OBJECTIVES))
    models.register("tiny_ae", lambda shape, n: models.autoencoder(shape, n, hidden=(2,)),
                    objective=models.RECONSTRUCTION)
    assert models.objective("tiny_ae") is models.RECONSTRUCTION
    models.register("tiny_ae", models.mlp, overwrite=True)
    assert models.objective("tiny_ae") is models.CLASSIFICATION
    with pytest.raises(TypeError, match="`objective` must be a models.Objective"):
        models.register("other", models.mlp, objective="reconstruction")
    with pytest.raises(ValueError, match="Received: name='nope'"):
        models.objective("nope")
