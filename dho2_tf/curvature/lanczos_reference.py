"""Eager numpy reference of the sharded Lanczos iteration, to validate the compiled program.

:func:`lanczos_eager` runs the iteration of :class:`dho2_tf.curvature.lanczos.LanczosProgram`
(same start vector, same collectives in the same order, the three-term recurrence and one
Gram-Schmidt pass with the norm from the same reduction) one step at a time in Python with
float64 numpy arrays. It is slow — one host round trip per collective — and exists so tests
can check that the compiled graph computes the same tridiagonal matrix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import tensorflow as tf

from dho2_tf.curvature.lanczos import (BREAKDOWN, NON_FINITE, LanczosResult, check_arguments,
                                       group_root, start_vector)
from dho2_tf.distributed.sharding import ShardLayout

if TYPE_CHECKING:
    from dho2_tf.distributed.comm import Communicator, Group


def lanczos_eager(hvp_fn: Callable[[tf.Tensor], tf.Tensor], n: int, m: int,
                  comm: Communicator, *, seed: int, process_set: Group | None = None,
                  hvp_dtype: tf.DType = tf.float32, breakdown_tol: float = 1e-10,
                  name: str = "dho2/lanczos_eager", hvp_reduce: str = "mean") -> LanczosResult:
    """The sharded-basis, float64 Lanczos iteration of ``LanczosProgram``, eagerly.

    Math: see :class:`dho2_tf.curvature.lanczos.LanczosProgram` (``basis_layout="sharded"``,
    ``basis_dtype="float64"``); the arguments mean the same.
    """
    check_arguments(n, m, hvp_reduce, breakdown_tol)
    layout = ShardLayout(n, comm.group_size(process_set), comm.group_rank(process_set))
    root = group_root(process_set)

    def local(x: np.ndarray) -> np.ndarray:
        return np.pad(x, (0, layout.padded_size - n))[layout.start:layout.stop]

    def allreduce(x: np.ndarray, purpose: str) -> np.ndarray:
        return comm.allreduce(tf.constant(x, tf.float64), "sum", name=f"{name}/{purpose}",
                              process_set=process_set).numpy()

    def hvp_shard(q: tf.Tensor) -> np.ndarray:
        h = tf.cast(tf.reshape(hvp_fn(q), [n]), hvp_dtype)
        if hvp_reduce == "root0":
            h = comm.broadcast(h, root, name=f"{name}/hvp_bc", process_set=process_set)
            return local(tf.cast(h, tf.float64).numpy())
        h_r = comm.reducescatter(layout.pad(h), "mean", name=f"{name}/hvp_rs",
                                 process_set=process_set)
        return tf.cast(h_r, tf.float64).numpy()

    q0 = comm.broadcast(tf.constant(start_vector(n, seed)), root, name=f"{name}/q0",
                        process_set=process_set).numpy()
    basis_r = np.zeros((m, layout.shard_size))
    basis_r[0] = local(q0)
    t = np.zeros((m, m))
    q = tf.constant(q0, hvp_dtype)
    m_eff, status = m, "ok"
    with np.errstate(invalid="ignore", over="ignore"):
        for i in range(m):
            h_r = hvp_shard(q)
            first = allreduce(np.array([basis_r[i] @ h_r, np.count_nonzero(~np.isfinite(h_r))]),
                              "alpha")
            if first[1] > 0 or not np.isfinite(first[0]):
                m_eff, status = i, f"{NON_FINITE} HVP at step {i}"
                break
            t[i, i] = first[0]
            if i == m - 1:
                break
            w_r = h_r - t[i, i] * basis_r[i] - (t[i - 1, i] * basis_r[i - 1] if i else 0.0)
            filled = basis_r[: i + 1]
            second = allreduce(np.append(filled @ w_r, w_r @ w_r), "reorth")
            w_r -= filled.T @ second[:-1]
            beta = float(np.sqrt(max(second[-1] - second[:-1] @ second[:-1], 0.0)))
            if not np.isfinite(beta):
                m_eff, status = i, f"{NON_FINITE} beta at step {i}"
                break
            if beta <= breakdown_tol * max(1.0, float(np.max(np.abs(np.diag(t)[: i + 1])))):
                m_eff, status = i + 1, f"{BREAKDOWN} at step {i}"
                break
            t[i, i + 1] = t[i + 1, i] = beta
            basis_r[i + 1] = w_r / beta
            full = comm.allgather(tf.constant(basis_r[i + 1], hvp_dtype), name=f"{name}/q",
                                  process_set=process_set)
            q = layout.unpad(full)
    t = t[:m_eff, :m_eff]
    if not status.startswith(NON_FINITE):
        t = comm.broadcast(tf.constant(t), root, name=f"{name}/tridiagonal",
                           process_set=process_set).numpy()
    return LanczosResult(tf.constant(t, tf.float64), tf.constant(basis_r[:m_eff], tf.float64),
                         m_eff, status)
