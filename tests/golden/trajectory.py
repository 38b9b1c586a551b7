"""DHO2's golden trajectory: weights and eigenvalues after 30 steps with two refreshes.

Usage (P = 1, one process; P ≥ 2 under ``horovodrun --gloo -np P``)::

    python tests/golden/trajectory.py OUT.npz

trains the same float64 MLP with every distribution mode and the ``momentum`` and ``adam`` bases
(``pipelined`` needs two ranks: one update rank and one curvature rank at P = 2) through
``model.fit`` with :class:`dho2_tf.CurvatureRefresh`, and rank 0 writes, per run
``P<P>/<mode>/<base>``, every rank's final flat weights (``/weights``, [P, n]) and the installed
eigenvalues (``/eigenvalues``, [K]) to ``OUT.npz``. ``tests/test_golden_trajectory.py`` compares
them with the recorded files beside this script, so a restructuring that changes any update
(even by a rounding) is caught. Float64 keeps the comparison independent of the CPU's vector
instruction set; the refreshes happen before updates 9 and 24 (warmup 10, every 15 steps).
"""

from __future__ import annotations

import sys

import numpy as np
import tensorflow as tf

tf.keras.backend.set_floatx("float64")

from dho2_tf import DHO2, CurvatureRefresh, HorovodComm, LocalComm  # noqa: E402
from dho2_tf.distributed.pipeline import pipeline_process_sets  # noqa: E402

D, C, B, STEPS = 10, 4, 8, 30
MODES = ("sharded", "replicated", "auto", "faithful", "admm", "pipelined")
BASES = ("momentum", "adam")
LEARNING_RATES = {"momentum": 0.05, "adam": 0.01}
# FOSI's clip of the base learning-rate scale c (the recording's; DHO2's default is 1).
C_MAX = {"momentum": 3.0, "adam": 1.0}
LOSS = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def make_model() -> tf.keras.Model:
    """10-16-4 tanh MLP (244 float64 parameters), the same initial weights on every rank."""
    tf.keras.utils.set_random_seed(0)
    return tf.keras.Sequential([tf.keras.Input((D,)),
                                tf.keras.layers.Dense(16, activation="tanh"),
                                tf.keras.layers.Dense(C)])


def rank_data(rank: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """This rank's STEPS batches of B rows (rank r takes rows r, r+P, ... of one global set)."""
    rng = np.random.default_rng(2024)
    x = rng.standard_normal((STEPS * B * size, D))
    y = rng.integers(0, C, STEPS * B * size).astype("int32")
    return x[rank::size], y[rank::size]


def run(comm, mode: str, base: str) -> tuple[np.ndarray, np.ndarray]:
    """Train 30 steps; returns (this rank's flat weights, the installed eigenvalues)."""
    opt = DHO2(learning_rate=LEARNING_RATES[base], base=base, c_max=C_MAX[base], k=3, ell=1,
               lanczos_order=12,
               refresh_every=15, warmup=10, mode=mode, comm=comm, tau=4, rho=0.05,
               curvature_ranks=1, delivery_delay=3)
    model = make_model()
    model.compile(optimizer=opt, loss=LOSS)
    x, y = rank_data(comm.rank, comm.size)
    refresh = CurvatureRefresh(batch=(x[:2 * B], y[:2 * B]))
    if opt.is_curvature_rank:
        opt.bind(model, LOSS, (x[:2 * B], y[:2 * B]))
        opt.serve_curvature()
    else:
        model.fit(x, y, batch_size=B, shuffle=False, verbose=0, callbacks=[refresh])
    weights = np.concatenate([v.numpy().ravel() for v in model.trainable_variables])
    metrics = opt.curvature_metrics()
    if not opt.is_curvature_rank:
        assert metrics["refreshes"] == 2, f"{mode}/{base}: {metrics['refreshes']} refreshes"
        assert metrics["guard_trips"] == 0, f"{mode}/{base}: the divergence guard tripped"
    eigenvalues = np.array([metrics[f"eigenvalue_{j}"] for j in range(opt.num_pairs)])
    return weights, eigenvalues


def main(out: str) -> None:
    import os

    distributed = "HOROVOD_RANK" in os.environ
    comm = HorovodComm(process_sets=pipeline_process_sets(1)) if distributed else LocalComm()
    results: dict[str, np.ndarray] = {}
    for mode in MODES:
        if mode == "pipelined" and comm.size < 2:
            continue
        for base in BASES:
            weights, eigenvalues = run(comm, mode, base)
            everyone = comm.allgather_object((weights, eigenvalues),
                                             name=f"golden/{mode}/{base}")
            key = f"P{comm.size}/{mode}/{base}"
            results[f"{key}/weights"] = np.stack([w for w, _ in everyone])
            results[f"{key}/eigenvalues"] = everyone[0][1]
    if comm.is_root:
        np.savez(out, **results)
        print(f"GOLDEN_TRAJECTORY_OK {len(results) // 2} runs -> {out}")


if __name__ == "__main__":
    main(sys.argv[1])
