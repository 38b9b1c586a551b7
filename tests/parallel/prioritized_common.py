"""Shared set-up of the multi-process prioritized-SGD scripts (run under ``horovodrun``)."""

from __future__ import annotations

import unittest

import numpy as np
import tensorflow as tf

from dho2_tf.distributed.comm import Communicator, default_comm


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


def classification_data(n: int, d: int = 10, classes: int = 4, seed: int = 0
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian inputs, labels from a random linear map (identical on every rank)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x, np.argmax(x @ rng.normal(size=(d, classes)), axis=1).astype(np.int32)


def mlp(d: int = 10, classes: int = 4, seed: int = 0) -> tf.keras.Model:
    """A small MLP with logits output, identically initialised on every rank."""
    tf.keras.utils.set_random_seed(seed)
    return tf.keras.Sequential([tf.keras.Input((d,)), tf.keras.layers.Dense(16, "tanh"),
                                tf.keras.layers.Dense(classes)])


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
