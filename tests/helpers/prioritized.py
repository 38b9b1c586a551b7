"""Small models and data shared by the prioritized-SGD tests, and the set-up of the
multi-process prioritized-SGD scripts (tests/parallel/prioritized_*.py, run under
``horovodrun``)."""

from __future__ import annotations

import unittest

import numpy as np
import tensorflow as tf

from dho2_tf.distributed.comm import Communicator, default_comm

SCCE = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def classification_data(n: int = 200, d: int = 8, classes: int = 3, seed: int = 0
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian inputs with labels from a random linear map."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = np.argmax(x @ rng.normal(size=(d, classes)), axis=1).astype(np.int32)
    return x, y


def mlp(d: int = 8, classes: int = 3, hidden: int = 16, seed: int = 0) -> tf.keras.Model:
    """A two-layer tanh MLP with logits output."""
    tf.keras.utils.set_random_seed(seed)
    return tf.keras.Sequential([tf.keras.Input((d,)),
                                tf.keras.layers.Dense(hidden, activation="tanh"),
                                tf.keras.layers.Dense(classes)])


def cnn(length: int = 16, classes: int = 3, seed: int = 0) -> tf.keras.Model:
    """A small 1-D CNN (weight-shared layers, so only the exact scorer applies)."""
    tf.keras.utils.set_random_seed(seed)
    return tf.keras.Sequential([tf.keras.Input((length,)),
                                tf.keras.layers.Reshape((length, 1)),
                                tf.keras.layers.Conv1D(4, 3, activation="relu"),
                                tf.keras.layers.MaxPool1D(2),
                                tf.keras.layers.Flatten(),
                                tf.keras.layers.Dense(classes)])


def loop_gradients(model: tf.keras.Model, loss_fn, x: np.ndarray, y: np.ndarray
                   ) -> list[np.ndarray]:
    """Reference per-example gradients: one GradientTape per example, stacked."""
    per_var: list[list[np.ndarray]] = [[] for _ in model.trainable_variables]
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(loss_fn(y[i:i + 1], model(x[i:i + 1], training=False)))
        for j, g in enumerate(tape.gradient(loss, model.trainable_variables)):
            per_var[j].append(g.numpy())
    return [np.stack(g) for g in per_var]


def flat_gradients(grads: list) -> np.ndarray:
    """[B, n_params] from a list of per-variable [B, ...] gradients."""
    return np.concatenate([np.reshape(np.asarray(g), (np.shape(g)[0], -1)) for g in grads], 1)


class HorovodTestCase(unittest.TestCase):
    """Creates the communicator once, skips on one rank, ends every test with a barrier."""

    comm: Communicator

    @classmethod
    def setUpClass(cls) -> None:
        cls.comm = default_comm()

    def setUp(self) -> None:
        if self.comm.size == 1:
            self.skipTest("needs at least 2 ranks (run under horovodrun -np 2)")

    def tearDown(self) -> None:
        self.comm.barrier(name=f"dho2/test/barrier/{self.id()}")

    def assert_replicas_equal(self, model: tf.keras.Model) -> None:
        """The model's weights are bit-identical on every rank."""
        flat = np.concatenate([np.ravel(v.numpy()) for v in model.variables])
        gathered = self.comm.allgather_object(flat, name=f"dho2/test/weights/{self.id()}")
        for other in gathered:
            np.testing.assert_array_equal(other, flat)


def contiguous_shard(arrays: list[np.ndarray], sizes: list[int], rank: int) -> list[np.ndarray]:
    """Rank ``rank``'s rows when the rows are split into consecutive blocks of ``sizes``."""
    start = sum(sizes[:rank])
    return [a[start:start + sizes[rank]] for a in arrays]


def main(tag: str) -> None:
    """Run the module's tests; print ``<tag> OK P=<size> ran=<n> skipped=<s>`` and exit."""
    import sys

    program = unittest.main(module="__main__", exit=False, verbosity=1)
    result = program.result
    size = default_comm().size
    ok = result.wasSuccessful()
    print(f"{tag} {'OK' if ok else 'FAILED'} P={size} ran={result.testsRun} "
          f"skipped={len(result.skipped)}", flush=True)
    sys.exit(0 if ok else 1)
