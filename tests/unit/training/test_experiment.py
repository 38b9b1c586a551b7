"""The training harness: config handling, train(), CIFAR augmentation and resuming."""

from __future__ import annotations


import numpy as np
import pytest
import tensorflow as tf

from dho2_tf.training import checkpointing, experiment
from dho2_tf.callbacks import ReplicaSync
from dho2_tf.training.data import cifar_augment
from dho2_tf.distributed.comm import LocalComm
from dho2_tf.training.dho2_arguments import DHO2Arguments
from dho2_tf.training.config_values import coerce, load_config_file
from dho2_tf.training.experiment import TrainConfig, load_data, train

#: Its ``train`` runs load the same MNIST-1D datasets: each is generated once per module.
pytestmark = pytest.mark.usefixtures("mnist1d_once")

TINY = {"num_samples": 500, "epochs": 1, "batch_size": 50, "verbose": 0}


# ------------------------------------------------------------------------------- config
def test_from_dict_coerces_types_and_accepts_dashes():
    config = TrainConfig.from_dict({"learning-rate": "1e-3", "epochs": 2.0, "resume": "yes",
                                    "target_accuracy": None, "c_max": 2})
    assert config.learning_rate == 1e-3 and config.epochs == 2 and config.resume is True
    assert config.target_accuracy is None and config.dho2.c_max == 2.0


@pytest.mark.parametrize("name, annotation, value", [
    ("epochs", "int", 1.5), ("epochs", "int", True), ("alpha", "float", "fast"),
    ("resume", "bool", "maybe"), ("notes", "dict[str, Any]", [1]), ("model", "str", 3),
])
def test_coerce_rejects_with_the_key_and_value(name, annotation, value):
    with pytest.raises(ValueError, match=f"`{name}` must be of type"):
        coerce(name, annotation, value)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="Unknown key 'lr' in config. Valid keys: "
                                         "allow_config_change, batch_size"):
        TrainConfig.from_dict({"lr": 0.1})


def test_load_config_file_yaml_json_and_empty(tmp_path):
    (tmp_path / "a.yml").write_text("epochs: 3\nlearning_rate: 2.8e-3\n")
    (tmp_path / "b.json").write_text('{"epochs": 4}')
    (tmp_path / "c.yaml").write_text("")
    assert load_config_file(tmp_path / "a.yml") == {"epochs": 3, "learning_rate": 2.8e-3}
    assert load_config_file(tmp_path / "b.json") == {"epochs": 4}
    assert load_config_file(tmp_path / "c.yaml") == {}


@pytest.mark.parametrize("field, value, message", [
    ("optimizer", "lion", "`optimizer` must be one of"),
    ("dataset", "imagenet", "`dataset` must be one of"),
    ("verbose", 3, "`verbose` must be an integer in [0, 2]"),
    ("refresh_every_epochs", 0, "`refresh_every_epochs` must be a positive integer"),
    ("prioritized_k", 0.0, "`k` must be a fraction in (0, 1]"),
    ("mode", "nonsense", "`mode` must be one of"),
])
def test_validate_names_the_bad_field(field, value, message):
    config = TrainConfig.from_dict({field: value, "prioritized": field == "prioritized_k"})
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        config.validate()


def test_refresh_every_epochs_converts_to_steps_and_the_dho2_section_passes_through():
    config = TrainConfig(refresh_every_epochs=8,
                         dho2=DHO2Arguments(warmup=0, eigenvalue_damping=5e-9))
    opt = config.make_dho2(1e-3, LocalComm(), steps_per_epoch=40)
    assert (opt.refresh_every, opt.warmup, opt.eigenvalue_damping) == (320, 0, 5e-9)


def test_digits_are_images_for_2d_resnets_only():
    assert load_data(TrainConfig(model="resnet20", dataset="digits")).input_shape == (8, 8, 1)
    assert load_data(TrainConfig(model="mlp", dataset="digits")).input_shape == (64,)


def test_cifar_training_set_is_augmented(monkeypatch):
    seen = {}
    fake = experiment.load_data(TrainConfig(model="resnet20", dataset="digits"))

    def fake_dataset(x, y, batch_size, **kwargs):
        seen["augment"] = kwargs.get("augment")
        raise RuntimeError("stop before training")

    monkeypatch.setattr(experiment, "load_data", lambda config: fake)
    monkeypatch.setattr(experiment, "check_cifar_path", lambda name, path: None)
    monkeypatch.setattr(experiment, "make_tf_dataset", fake_dataset)
    config = TrainConfig(model="mlp", dataset="cifar10", data_dir="unused", optimizer="adam",
                         learning_rate=1e-3, **TINY)
    with pytest.raises(RuntimeError, match="stop before training"):
        train(config, LocalComm())
    assert seen["augment"] is cifar_augment
    with pytest.raises(RuntimeError, match="stop before training"):
        train(TrainConfig.from_dict({**config.__dict__, "dataset": "mnist1d"}), LocalComm())
    assert seen["augment"] is None


# ------------------------------------------------------------------------------- train
@pytest.mark.parametrize("optimizer", ["dho2", "momentum"])
def test_train_one_epoch_returns_history(optimizer):
    config = TrainConfig.from_dict(dict(optimizer=optimizer, refresh_every=4, warmup=2, k=2,
                                        curvature_batch=50, **TINY))
    result = train(config, LocalComm())
    assert len(result.history) == 1 and result.steps_per_epoch == 8
    assert 0.0 <= result.test_accuracy <= 1.0 and result.wall_seconds >= result.train_seconds
    assert len(result.refreshes) == (2 if optimizer == "dho2" else 0)


def test_train_stops_at_the_target():
    result = train(TrainConfig(optimizer="adam", learning_rate=1e-3, target_accuracy=0.0,
                               **{**TINY, "epochs": 5}), LocalComm())
    assert len(result.history) == 1 and result.time_to_target == result.train_seconds


def test_prioritized_training_runs():
    config = TrainConfig(optimizer="sgd", prioritized=True, prioritized_k=0.1,
                         prioritized_r=0.05, **TINY)
    result = train(config, LocalComm())
    assert len(result.history) == 1 and result.steps_per_epoch == 10


# ------------------------------------------------------------------------------ resume
def _weights(result_model):
    return [v.numpy().copy() for v in result_model.variables]


@pytest.mark.parametrize("optimizer", ["dho2", "momentum"])
def test_two_epochs_then_resume_equal_three_epochs_straight(tmp_path, optimizer):
    """Checkpoint at the end of epoch 2, a new train() resumes: same data order, same result."""
    seen = {}

    class Keep(tf.keras.callbacks.Callback):
        def on_train_end(self, logs=None):
            seen["weights"] = _weights(self.model)
            seen["optimizer"] = [v.numpy().copy() for v in self.model.optimizer.variables]

    base = dict(optimizer=optimizer, k=2, refresh_every=4, warmup=2, curvature_batch=50,
                **{**TINY, "epochs": 3})
    straight = train(TrainConfig.from_dict(base), LocalComm(), extra_callbacks=[Keep()])
    want = dict(seen)
    folder = str(tmp_path / "ckpt")

    class DiesAfterEpoch2(tf.keras.callbacks.Callback):  # the run is cut off after epoch 2
        def on_epoch_end(self, epoch, logs=None):
            self.model.stop_training = epoch == 1

    first = train(TrainConfig.from_dict({**base, "checkpoint_dir": folder}), LocalComm(),
                  extra_callbacks=[DiesAfterEpoch2()])
    assert checkpointing.read_manifest(folder).epoch == 2 and first.initial_epoch == 0
    resumed = train(TrainConfig.from_dict({**base, "checkpoint_dir": folder, "resume": True}),
                    LocalComm(), extra_callbacks=[Keep()])
    assert resumed.initial_epoch == 2 and len(resumed.history) == 1
    assert checkpointing.read_manifest(folder).epoch == 3
    for got, ref in zip(seen["weights"] + seen["optimizer"], want["weights"] + want["optimizer"]):
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
    assert resumed.test_accuracy == straight.test_accuracy
    if optimizer == "dho2":  # the refresh schedule continues from the restored step counter
        assert len(first.refreshes) + len(resumed.refreshes) == len(straight.refreshes)


def test_resume_needs_more_epochs_than_the_checkpoint_has(tmp_path):
    config = TrainConfig(optimizer="adam", learning_rate=1e-3, checkpoint_dir=str(tmp_path),
                         **TINY)
    train(config, LocalComm())
    with pytest.raises(ValueError, match="already completed 1 epochs; `epochs` must exceed"):
        train(TrainConfig.from_dict({**config.__dict__, "resume": True}), LocalComm())


def test_resume_without_a_checkpoint_starts_fresh(tmp_path):
    config = TrainConfig(optimizer="adam", learning_rate=1e-3, checkpoint_dir=str(tmp_path),
                         resume=True, **TINY)
    assert train(config, LocalComm()).initial_epoch == 0
    assert checkpointing.read_manifest(tmp_path).epoch == 1


class _Rank0Says(LocalComm):
    def broadcast(self, x, root=0, *, name, process_set=None):
        return tf.ones_like(x)  # rank 0 decided to stop

    def grouped_allreduce(self, xs, op="sum", *, name, process_set=None):
        return [x + 1.0 for x in xs]  # stands for the mean over ranks


def test_replica_sync_follows_rank0_stop_and_averages_statistics():
    model = tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.BatchNormalization()])
    after = ReplicaSync(_Rank0Says(), phase="after")
    after.set_model(model)
    model.stop_training = False
    after.on_epoch_end(0)
    assert model.stop_training is True
    before = ReplicaSync(_Rank0Says(), phase="before")
    before.set_model(model)
    before.on_epoch_end(0)
    np.testing.assert_array_equal(model.layers[0].moving_variance.numpy(), 2.0)


# ------------------------------------------------------------- training-loss tasks (FOSI)
MNIST5K = {"dataset": "mnist5k", "num_samples": 200, "epochs": 1, "batch_size": 40,
           "weight_decay": 0.0, "verbose": 0, "optimizer": "adam", "learning_rate": 1e-3,
           "schedule": "constant"}


class _KeepModel(tf.keras.callbacks.Callback):
    def on_train_end(self, logs=None):
        self.final = self.model


def _train_keeping_model(config):
    keep = _KeepModel()
    result = train(config, LocalComm(), extra_callbacks=[keep])
    return result, keep.final, load_data(config)


def test_autoencoder_reconstructs_its_input_with_sigmoid_cross_entropy():
    config = TrainConfig(model="autoencoder", **MNIST5K)
    result, model, data = _train_keeping_model(config)
    assert isinstance(model.loss, tf.keras.losses.BinaryCrossentropy)
    assert model.loss.get_config()["from_logits"] is True
    assert not model.compiled_metrics._user_metrics  # no accuracy metric
    row = result.history[-1]
    assert np.isnan(row["test_accuracy"]) and np.isnan(result.best_accuracy)
    # train_loss is the loss of the final weights on the full training set, targets = inputs.
    z = model.predict(data.x_train, verbose=0).astype(np.float64)
    x = data.x_train.astype(np.float64)
    expected = np.mean(np.maximum(z, 0) - z * x + np.log1p(np.exp(-np.abs(z))))
    assert row["train_loss"] == pytest.approx(expected, rel=1e-4)
    assert result.train_loss == row["train_loss"] == result.best_train_loss
    assert np.isfinite(row["epoch_loss"]) and row["epoch_loss"] != row["train_loss"]


def test_logreg_train_loss_is_softmax_cross_entropy_of_the_full_training_set():
    config = TrainConfig(model="logreg", **{**MNIST5K, "epochs": 2})
    result, model, data = _train_keeping_model(config)
    assert isinstance(model.loss, tf.keras.losses.SparseCategoricalCrossentropy)
    assert len(result.history) == 2 and 0.0 <= result.test_accuracy <= 1.0
    logits = model.predict(data.x_train, verbose=0).astype(np.float64)
    log_p = logits - logits.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    expected = -np.mean(log_p[np.arange(len(data.y_train)), data.y_train])
    assert result.history[-1]["train_loss"] == pytest.approx(expected, rel=1e-4)
    assert result.best_train_loss == min(row["train_loss"] for row in result.history)


def test_target_loss_stops_at_the_first_epoch_at_or_below_it():
    result = train(TrainConfig(model="logreg", target_loss=50.0, **{**MNIST5K, "epochs": 4}),
                   LocalComm())
    assert len(result.history) == 1 and result.time_to_target == result.train_seconds
    missed = train(TrainConfig(model="logreg", target_loss=1e-6, **{**MNIST5K, "epochs": 2}),
                   LocalComm())
    assert len(missed.history) == 2 and missed.time_to_target is None


def test_dho2_curvature_batch_of_the_autoencoder_uses_inputs_as_targets(monkeypatch):
    batches = []

    class Recording(experiment.CurvatureRefresh):
        def __init__(self, batch, **kwargs):
            super().__init__(batch, **kwargs)
            batches.append(self.batch)

    monkeypatch.setattr(experiment, "CurvatureRefresh", Recording)
    config = TrainConfig.from_dict(dict(model="autoencoder", base="adam", k=2, alpha=0.01,
                                        refresh_every=3, warmup=2, curvature_batch=20,
                                        **{**MNIST5K, "optimizer": "dho2"}))
    result = train(config, LocalComm())
    (x, y), = batches
    assert x.shape == (20, 784) and np.array_equal(x, y)
    assert len(result.refreshes) == 1 and np.isfinite(result.train_loss)


@pytest.mark.parametrize("fields, message", [
    ({"target_loss": 0.0}, "`target_loss` must be a finite number in (0.0, inf)"),
    ({"target_loss": -1.0}, "Received: target_loss=-1.0"),
    ({"model": "autoencoder", "dataset": "mnist5k", "target_accuracy": 0.5},
     "`target_accuracy` needs a model with an accuracy metric; model='autoencoder' is trained "
     "on reconstruction"),
    ({"target_accuracy": 0.5, "target_loss": 0.1},
     "Set at most one of `target_accuracy` and `target_loss`"),
    ({"model": "autoencoder", "dataset": "cifar10", "data_dir": "x"},
     "model='autoencoder' reconstructs its input, which the CIFAR augmentation would change"),
    ({"dataset": "mnist5k", "num_samples": 5010},
     "`num_samples` must be a multiple of 10 in [10, 5000] for dataset='mnist5k'"),
])
def test_validate_training_loss_options(fields, message):
    with pytest.raises(ValueError) as err:
        TrainConfig.from_dict(fields).validate()
    assert message in str(err.value)


def test_mnist5k_is_flat_except_for_2d_resnets():
    assert load_data(TrainConfig(model="logreg", dataset="mnist5k",
                                 num_samples=100)).input_shape == (784,)
    assert load_data(TrainConfig(model="resnet20", dataset="mnist5k",
                                 num_samples=100)).input_shape == (28, 28, 1)


@pytest.mark.parametrize("kwargs, message", [
    ({"target_loss": 0.1}, "`target_loss` needs `train_data`"),
    ({"train_data": (np.zeros((3, 2)),)}, "`train_data` must be an (x, targets) pair"),
    ({"train_data": (np.zeros((3, 2)), np.zeros(2))}, "Received: 2 item(s) with [3, 2] rows"),
    ({"train_data": (np.zeros((3, 2)), np.zeros(3)), "target_loss": 0.1,
      "target_accuracy": 0.5}, "Set at most one of `target_accuracy` and `target_loss`"),
    ({"train_data": (np.zeros((3, 2)), np.zeros(3)), "target_loss": float("nan")},
     "`target_loss` must be a finite number"),
])
def test_clock_rejects_bad_training_loss_arguments(kwargs, message):
    from dho2_tf.callbacks import TestAccuracyClock

    with pytest.raises(ValueError) as err:
        TestAccuracyClock(np.zeros((3, 2)), np.zeros(3), **kwargs)
    assert message in str(err.value)


def test_clock_refuses_an_accuracy_target_without_an_accuracy_metric():
    from dho2_tf.callbacks import TestAccuracyClock

    model = tf.keras.Sequential([tf.keras.Input((2,)), tf.keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss=tf.keras.losses.BinaryCrossentropy(from_logits=True))
    x = np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError, match="`target_accuracy` needs a model compiled with an "
                                         "accuracy metric"):
        model.fit(x, x, epochs=1, verbose=0, callbacks=[TestAccuracyClock(x, x, 0.5)])
