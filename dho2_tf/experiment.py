"""One training run from a flat configuration: what ``jobs/train.py`` and the benchmarks call.

The run builds the dataset (sharded by rank), the model, the optimizer (DHO2 or a Horovod
data-parallel Keras baseline) and the callbacks, trains with ``model.fit`` and returns the test
accuracy history against training wall time. Logs and the progress bar appear on rank 0 only.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import numpy as np
import tensorflow as tf

from dho2_tf.callbacks import BroadcastInitialState, CurvatureRefresh, TestAccuracyClock
from dho2_tf.data import load_dataset, make_tf_dataset, shard_arrays
from dho2_tf.distributed.comm import Communicator, default_comm
from dho2_tf.optimizer import DHO2
from dho2_tf.validation import check_int, check_real

logger = logging.getLogger(__name__)

OPTIMIZERS = ("dho2", "adam", "sgd", "momentum")
SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run needs; field names are the CLI flags of ``jobs/train.py``.

    Attributes:
        model: registry name (``models.available()``).
        dataset: ``mnist1d``, ``digits``, ``cifar10`` or ``cifar100``.
        data_dir: folder of the CIFAR python-pickle files.
        num_samples: MNIST-1D samples to generate (80% train).
        optimizer: ``dho2`` or a data-parallel baseline: ``adam``, ``sgd``, ``momentum``.
        base: DHO2's base optimizer.
        mode: DHO2's distribution mode.
        learning_rate: peak (base) learning rate.
        schedule: ``constant`` or ``cosine`` decay over the whole run.
        epochs: maximum number of epochs.
        batch_size: per-rank batch size (global batch = ranks × batch_size).
        weight_decay: L2 coefficient put into the model's loss.
        momentum: momentum of ``momentum``/``nesterov`` (DHO2 base and baseline).
        k, ell, alpha, refresh_every, warmup, lanczos_order, c_max: DHO2 hyper-parameters.
        curvature_batch: global curvature-batch size (split across ranks).
        seed: seed of weights, data order and Lanczos.
        target_accuracy: stop at this test accuracy.
        verbose: Keras verbosity on rank 0 (0, 1 progress bar, 2 one line per epoch).
    """

    model: str = "mlp"
    dataset: str = "mnist1d"
    data_dir: str | None = None
    num_samples: int = 5000
    optimizer: str = "dho2"
    base: str = "momentum"
    mode: str = "sharded"
    learning_rate: float = 0.1
    schedule: str = "cosine"
    epochs: int = 60
    batch_size: int = 50
    weight_decay: float = 3e-4
    momentum: float = 0.9
    k: int = 10
    ell: int = 0
    alpha: float = 0.01
    refresh_every: int = 200
    warmup: int = 40
    lanczos_order: int | None = None
    c_max: float | None = None
    curvature_batch: int = 500
    seed: int = 0
    target_accuracy: float | None = None
    verbose: int = 1

    def validate(self) -> None:
        """Raise ValueError on any bad field, before data is loaded or a collective runs."""
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"`optimizer` must be one of {OPTIMIZERS}. "
                             f"Received: optimizer={self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"`schedule` must be one of {SCHEDULES}. "
                             f"Received: schedule={self.schedule!r}")
        check_int("epochs", self.epochs, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        check_int("curvature_batch", self.curvature_batch, minimum=1)
        check_real("learning_rate", self.learning_rate, minimum=0.0, open_min=True)
        check_real("weight_decay", self.weight_decay, minimum=0.0)
        if self.target_accuracy is not None:
            check_real("target_accuracy", self.target_accuracy, minimum=0.0, maximum=1.0)
        if self.optimizer == "dho2":
            self.make_dho2(learning_rate=self.learning_rate, comm=None)  # validates DHO2 args

    def make_dho2(self, learning_rate: Any, comm: Communicator | None) -> DHO2:
        """The DHO2 optimizer this configuration describes."""
        return DHO2(learning_rate=learning_rate, base=self.base, k=self.k, ell=self.ell,
                    alpha=self.alpha, c_max=self.c_max, lanczos_order=self.lanczos_order,
                    refresh_every=self.refresh_every, warmup=self.warmup,
                    momentum=self.momentum, mode=self.mode, seed=self.seed, comm=comm)


@dataclasses.dataclass
class TrainResult:
    """Outcome of :func:`train`.

    Attributes:
        test_accuracy: final test accuracy.
        best_accuracy: best test accuracy over epochs.
        train_seconds: training wall time (evaluation excluded).
        time_to_target: training seconds until ``target_accuracy`` was reached, else None.
        history: one dict per epoch (epoch, seconds, test_accuracy, test_loss, train_loss).
        refreshes: DHO2 refresh records (index, seconds, status, eigenvalues, scale).
        ranks: number of ranks.
    """

    test_accuracy: float
    best_accuracy: float
    train_seconds: float
    time_to_target: float | None
    history: list[dict[str, float]]
    refreshes: list[dict[str, Any]]
    ranks: int


def learning_rate_for(config: TrainConfig, total_steps: int) -> Any:
    """A float or a cosine-decay schedule over ``total_steps``."""
    if config.schedule == "cosine":
        return tf.keras.optimizers.schedules.CosineDecay(config.learning_rate, total_steps)
    return config.learning_rate


def make_optimizer(config: TrainConfig, total_steps: int, comm: Communicator) -> Any:
    """DHO2, or a Keras first-order optimizer made data-parallel by the communicator."""
    lr = learning_rate_for(config, total_steps)
    if config.optimizer == "dho2":
        return config.make_dho2(lr, comm)
    if config.optimizer == "adam":
        base = tf.keras.optimizers.Adam(learning_rate=lr)
    else:
        base = tf.keras.optimizers.SGD(learning_rate=lr, momentum=config.momentum
                                       if config.optimizer == "momentum" else 0.0)
    return comm.data_parallel_optimizer(base)


def train(config: TrainConfig, comm: Communicator | None = None,
          extra_callbacks: list[tf.keras.callbacks.Callback] | None = None) -> TrainResult:
    """Train one model as ``config`` says; every rank must call it with the same config."""
    import models

    config.validate()
    comm = comm or default_comm()
    kwargs = {"num_samples": config.num_samples} if config.dataset == "mnist1d" else {}
    if config.dataset.startswith("cifar"):
        kwargs = {"path": config.data_dir}
    data = load_dataset(config.dataset, **kwargs)
    tf.keras.utils.set_random_seed(config.seed)
    model = models.get(config.model, data.input_shape, data.num_classes,
                       weight_decay=config.weight_decay)
    steps_per_epoch = len(data.x_train) // comm.size // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"`batch_size`={config.batch_size} is larger than a rank's share of "
                         f"the {len(data.x_train)} training examples over {comm.size} ranks.")
    optimizer = make_optimizer(config, steps_per_epoch * config.epochs, comm)
    model.compile(optimizer=optimizer, metrics=["accuracy"],
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    train_ds = make_tf_dataset(data.x_train, data.y_train, config.batch_size, comm=comm,
                               seed=config.seed)
    clock = TestAccuracyClock(data.x_test, data.y_test, config.target_accuracy)
    callbacks: list[tf.keras.callbacks.Callback] = []
    curvature = None
    if config.optimizer == "dho2":
        x_r, y_r = shard_arrays(data.x_train, data.y_train, comm)
        per_rank = max(1, config.curvature_batch // comm.size)
        curvature = CurvatureRefresh(batch=(x_r[:per_rank], y_r[:per_rank]))
        callbacks.append(curvature)
    else:
        callbacks.append(BroadcastInitialState(comm))
    callbacks += [clock, *(extra_callbacks or [])]
    if comm.is_root:
        logger.info("training %s on %s with %s over %d rank(s), %d steps/epoch", config.model,
                    config.dataset, config.optimizer, comm.size, steps_per_epoch)
    start = time.perf_counter()
    model.fit(train_ds, epochs=config.epochs, callbacks=callbacks,
              verbose=config.verbose if comm.is_root else 0)
    wall = time.perf_counter() - start
    accs = [row["test_accuracy"] for row in clock.history]
    return TrainResult(test_accuracy=accs[-1], best_accuracy=float(np.max(accs)),
                       train_seconds=clock.history[-1]["seconds"] if clock.history else wall,
                       time_to_target=clock.time_to_target, history=clock.history,
                       refreshes=curvature.refreshes if curvature else [], ranks=comm.size)
