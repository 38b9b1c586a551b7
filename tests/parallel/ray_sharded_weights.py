"""The final weights of a short DHO2 ``sharded`` run of the MNIST-1D MLP, under either launcher.

:func:`final_weights` is one rank of :func:`dho2_tf.training.experiment.train` (the function both
``jobs/train.py`` under ``horovodrun`` and ``dho2_tf.training.ray_launcher`` run) that also returns the
model's weights at the end of training. Run as a script under ``horovodrun -np 2`` it saves rank
0's weights to the ``.npz`` file named by its first argument; ``tests/test_parallel_ray.py`` runs
the same function on Ray workers and compares. :func:`fail_on_rank` makes one worker fail.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

# Two epochs of 800 training examples over two ranks (16 steps), two curvature refreshes.
CONFIG: dict[str, Any] = {
    "model": "mlp", "dataset": "mnist1d", "num_samples": 1000, "optimizer": "dho2",
    "mode": "sharded", "base": "momentum", "learning_rate": 0.1, "epochs": 2, "batch_size": 50,
    "k": 2, "refresh_every": 5, "warmup": 2, "curvature_batch": 64, "seed": 7, "verbose": 0,
}


def final_weights(values: dict[str, Any]) -> list[np.ndarray]:
    """Train the config ``values`` on this rank; the model's weights after the last epoch."""
    import tensorflow as tf

    from dho2_tf.training.experiment import TrainConfig, make_comm, train

    class KeepWeights(tf.keras.callbacks.Callback):
        def on_train_end(self, logs=None):
            self.weights = self.model.get_weights()

    config = TrainConfig.from_dict(values)
    keep = KeepWeights()
    train(config, make_comm(config), extra_callbacks=[keep])
    return keep.weights


def main() -> None:
    from dho2_tf.distributed.comm import default_comm

    weights = final_weights(CONFIG)
    if default_comm().is_root:
        np.savez(sys.argv[1], *weights)


if __name__ == "__main__":
    main()


def fail_on_rank(failing_rank: int) -> float:
    """Raise on ``failing_rank`` before the first collective; the others wait in an allreduce."""
    import tensorflow as tf

    from dho2_tf.distributed.comm import default_comm

    comm = default_comm()
    if comm.rank == failing_rank:
        raise ValueError(f"rank {comm.rank} fails on purpose")
    return float(comm.allreduce(tf.constant(1.0), name="dho2/test/never_completes"))
