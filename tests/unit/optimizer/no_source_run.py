"""Run under horovodrun: DHO2 trained by ``fit`` with no curvature source.

Usage:
  no_source_run.py same        every rank warns once when the first refresh is due, and the
                               rank check passes; training finishes
  no_source_run.py mismatch    rank 1 uses another k: the rank check in that path raises on
                               every rank
"""

from __future__ import annotations

import logging
import sys

import numpy as np
import tensorflow as tf

from dho2_tf import DHO2, HorovodComm


class RankPrinter(logging.Handler):
    """Print DHO2's warnings with this rank's id, so the test can tell the ranks apart."""

    def __init__(self, rank: int) -> None:
        super().__init__(logging.WARNING)
        self.rank = rank

    def emit(self, record: logging.LogRecord) -> None:
        print(f"rank {self.rank} LOG {record.getMessage()}", flush=True)


def main(case: str) -> None:
    comm = HorovodComm()
    logging.getLogger("dho2_tf").addHandler(RankPrinter(comm.rank))
    rng = np.random.default_rng(comm.rank)
    x = rng.standard_normal((96, 5)).astype("float32")
    y = x.sum(axis=1, keepdims=True).astype("float32")
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([tf.keras.Input((5,)), tf.keras.layers.Dense(4, activation="tanh"),
                                 tf.keras.layers.Dense(1)])
    k = 3 if case == "mismatch" and comm.rank == 1 else 2
    opt = DHO2(learning_rate=0.01, base="sgd", k=k, refresh_every=4, warmup=3, comm=comm)
    model.compile(optimizer=opt, loss="mse")
    try:
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    except tf.errors.OpError as err:
        print(f"rank {comm.rank} FIT_ERROR {err.message}", flush=True)
        return
    print(f"rank {comm.rank} DONE iterations={int(opt.iterations.numpy())} "
          f"refreshes={opt.refresh_index()} checked={opt.consistency_checked}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
