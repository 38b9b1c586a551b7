"""Sharded Lanczos with full re-orthogonalisation (the SHARDED_ESE pattern, reference §4.2).

The basis Q is split by columns across the ranks of a group (``ShardLayout``); each rank keeps
only Q_r ∈ ℝ^{m×s} (float64). Only small coefficient vectors and one padded vector per step
travel between ranks. The loop runs eagerly in Python; ``hvp_fn`` is expected to be a traced
``tf.function`` (see :func:`dho2_tf.curvature.hvp.make_hvp_fn`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, NamedTuple

import numpy as np
import tensorflow as tf

from dho2_tf.distributed.sharding import ShardLayout
from dho2_tf.validation import check_int

if TYPE_CHECKING:
    from dho2_tf.distributed.comm import Communicator, Group

logger = logging.getLogger(__name__)

NON_FINITE = "non-finite"
BREAKDOWN = "breakdown"


HVP_REDUCTIONS = ("mean", "root0")


class LanczosResult(NamedTuple):
    """Output of :func:`lanczos`.

    Attributes:
        tridiagonal: T, float64 [m_eff, m_eff]; identical on every rank of the group (broadcast
            from the group root). Not broadcast when ``status`` is non-finite.
        basis_r: Q_r, float64 [m_eff, s]; this rank's columns of the orthonormal basis Q.
        num_steps: m_eff, the number of basis vectors (m unless the iteration stopped early).
        status: ``"ok"``, ``"breakdown at step i"`` or ``"non-finite <what> at step i"``.
    """

    tridiagonal: tf.Tensor
    basis_r: tf.Tensor
    num_steps: int
    status: str


def group_root(process_set: Group | None) -> int:
    """Global rank of the group's root (its lowest rank; 0 for all ranks)."""
    return 0 if process_set is None else process_set.ranks[0]


def _start_vector(n: int, seed: int, comm: Communicator, process_set: Group | None,
                  name: str) -> np.ndarray:
    """q₀ ~ N(0, I_n)/‖·‖ from ``np.random.default_rng(seed)``, as the group root drew it."""
    q0 = np.random.default_rng(seed).standard_normal(n)
    q0 /= np.linalg.norm(q0)
    q0 = comm.broadcast(tf.constant(q0, tf.float64), group_root(process_set),
                        name=f"{name}/q0", process_set=process_set)
    return q0.numpy()


class _GroupOps:
    """The collectives of one Lanczos run, bound to its group, layout and names."""

    def __init__(self, hvp_fn: Callable[[tf.Tensor], tf.Tensor], layout: ShardLayout,
                 comm: Communicator, process_set: Group | None, hvp_dtype: tf.DType,
                 name: str, hvp_reduce: str) -> None:
        self.hvp_fn, self.layout, self.comm = hvp_fn, layout, comm
        self.process_set, self.hvp_dtype, self.name = process_set, hvp_dtype, name
        self.hvp_reduce = hvp_reduce

    def local(self, x: np.ndarray) -> np.ndarray:
        """This rank's shard x_r of a full [n] vector (zero-padded)."""
        padded = np.pad(x, (0, self.layout.padded_size - self.layout.n))
        return padded[self.layout.start:self.layout.stop]

    def hvp_shard(self, q: tf.Tensor) -> np.ndarray:
        """h_r = fp64(reducescatter_mean(pad(H_r q))), float64 [s].

        With ``hvp_reduce="root0"`` the group root's HVP is broadcast instead and every rank
        keeps its shard of it (the released DHO2 code's pattern, reference §4.1).
        """
        h = tf.cast(tf.reshape(self.hvp_fn(q), [self.layout.n]), self.hvp_dtype)
        if self.hvp_reduce == "root0":
            h = self.comm.broadcast(h, group_root(self.process_set), name=f"{self.name}/hvp_bc",
                                    process_set=self.process_set)
            return self.local(tf.cast(h, tf.float64).numpy())
        h_r = self.comm.reducescatter(self.layout.pad(h), "mean", name=f"{self.name}/hvp_rs",
                                      process_set=self.process_set)
        return tf.cast(h_r, tf.float64).numpy()

    def allreduce_sum(self, x: np.ndarray, purpose: str) -> np.ndarray:
        """Σ over the group of a small float64 vector."""
        out = self.comm.allreduce(tf.constant(x, tf.float64), "sum",
                                  name=f"{self.name}/{purpose}", process_set=self.process_set)
        return out.numpy()

    def gather(self, x_r: np.ndarray) -> tf.Tensor:
        """unpad(allgather(x_r)) in ``hvp_dtype`` [n]: the full vector for the next HVP."""
        full = self.comm.allgather(tf.constant(x_r, self.hvp_dtype), name=f"{self.name}/q",
                                   process_set=self.process_set)
        return self.layout.unpad(full)

    def broadcast_from_root(self, x: np.ndarray, purpose: str) -> np.ndarray:
        """The group root's float64 ``x`` on every member."""
        out = self.comm.broadcast(tf.constant(x, tf.float64), group_root(self.process_set),
                                  name=f"{self.name}/{purpose}", process_set=self.process_set)
        return out.numpy()


def lanczos(hvp_fn: Callable[[tf.Tensor], tf.Tensor], n: int, m: int, comm: Communicator, *,
            seed: int, process_set: Group | None = None, hvp_dtype: tf.DType = tf.float32,
            breakdown_tol: float = 1e-10, name: str = "dho2/lanczos",
            hvp_reduce: str = "mean") -> LanczosResult:
    """m steps of Lanczos on the rank-averaged Hessian, basis sharded over the group.

    Math:
        H_r is ``hvp_fn`` on rank r (its own batch), H̄ = (1/P) Σ_r H_r over the P ranks of
        ``process_set``; m = ``m``, ε_brk = ``breakdown_tol``. Per step i = 0…m−1 (reference
        §4.2 SHARDED_ESE, §3.1):

            h_r  = fp64(reducescatter_mean(pad(H_r q_i)))        # shard of H̄ q_i
            a    = Σ_r Q_r h_r ;  T_ii = a_i
            w_r  = h_r − Q_rᵀ a ;  w_r ← w_r − Q_rᵀ (Σ_r Q_r w_r)  # full re-orthogonalisation, 2×
            β    = (Σ_r ‖w_r‖²)^½ ;  stop if β ≤ ε_brk · max(1, max_j |T_jj|)
            T_{i,i+1} = T_{i+1,i} = β ;  q_{i+1} = w/β

        with q₀ ~ N(0, I_n)/‖·‖ drawn from ``seed`` and broadcast from the group root. Then
        Q T Qᵀ ≈ H̄ restricted to the Krylov space K_m(H̄, q₀), and Q Qᵀ = I_{m_eff}.

    Every rank issues the same collectives in the same order: the stop decisions use only
    all-reduced values. Unfilled rows of Q_r are zero, so the coefficient vectors always have
    length m (+1 for the non-finite flag).

    Args:
        hvp_fn: ``hvp_fn(v: hvp_dtype [n]) -> [n]``, this rank's Hessian-vector product.
        n: length of the flat parameter vector.
        m: Lanczos order (number of HVPs at most).
        comm: communicator; the layout is ``ShardLayout(n, group size, group rank)``.
        seed: seed of the start vector (the same on every rank).
        process_set: group running the iteration; ``None`` for all ranks.
        hvp_dtype: dtype of the vectors handed to ``hvp_fn`` and of the HVP reduction. Defaults
            to ``tf.float32``; basis and coefficients are always float64.
        breakdown_tol: ε_brk. Defaults to 1e-10.
        name: prefix of the collective names.
        hvp_reduce: ``"mean"`` (H̄ = mean of the ranks' Hessians) or ``"root0"`` (every rank
            adopts the group root's H_r, as the released DHO2 code does; reference §4.1).

    Returns:
        A :class:`LanczosResult`. On a non-finite HVP or β the iteration stops, ``status``
        starts with ``"non-finite"`` and the caller should keep its previous eigenpairs.

    Raises:
        ValueError: if ``n`` or ``m`` is not a positive integer or ``breakdown_tol`` < 0.
    """
    check_int("n", n, minimum=1)
    check_int("m", m, minimum=1)
    if hvp_reduce not in HVP_REDUCTIONS:
        raise ValueError(f"`hvp_reduce` must be one of {HVP_REDUCTIONS}. "
                         f"Received: hvp_reduce={hvp_reduce!r}")
    if not breakdown_tol >= 0.0:
        raise ValueError(
            f"`breakdown_tol` must be non-negative. Received: breakdown_tol={breakdown_tol}")
    ops = _GroupOps(hvp_fn, ShardLayout(n, comm.group_size(process_set),
                                        comm.group_rank(process_set)),
                    comm, process_set, hvp_dtype, name, hvp_reduce)
    q0 = _start_vector(n, seed, comm, process_set, name)
    basis_r = np.zeros((m, ops.layout.shard_size))
    basis_r[0] = ops.local(q0)
    t = np.zeros((m, m))
    q = tf.constant(q0, hvp_dtype)
    m_eff, status = m, "ok"
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite HVPs are handled below
        for i in range(m):
            h_r = ops.hvp_shard(q)
            coef = ops.allreduce_sum(
                np.append(basis_r @ h_r, np.count_nonzero(~np.isfinite(h_r))), "coef")
            if coef[-1] > 0 or not np.all(np.isfinite(coef)):
                m_eff, status = i, f"{NON_FINITE} HVP at step {i}"
                break
            t[i, i] = coef[i]
            if i == m - 1:
                break
            w_r = h_r - basis_r.T @ coef[:-1]
            w_r -= basis_r.T @ ops.allreduce_sum(basis_r @ w_r, "reorth")
            beta = float(np.sqrt(ops.allreduce_sum(np.array([w_r @ w_r]), "norm")[0]))
            if not np.isfinite(beta):
                m_eff, status = i, f"{NON_FINITE} beta at step {i}"
                break
            if beta <= breakdown_tol * max(1.0, float(np.max(np.abs(np.diag(t)[: i + 1])))):
                m_eff, status = i + 1, f"{BREAKDOWN} at step {i}"
                break
            t[i, i + 1] = t[i + 1, i] = beta
            basis_r[i + 1] = w_r / beta
            q = ops.gather(basis_r[i + 1])
    t = t[:m_eff, :m_eff]
    if not status.startswith(NON_FINITE):
        t = ops.broadcast_from_root(t, "tridiagonal")
    if status != "ok" and comm.rank == group_root(process_set):
        logger.warning("Lanczos stopped early (%s); m_eff=%d of m=%d.", status, m_eff, m)
    logger.debug("Lanczos done: n=%d, m_eff=%d, status=%s", n, m_eff, status)
    return LanczosResult(tf.constant(t, tf.float64), tf.constant(basis_r[:m_eff], tf.float64),
                         m_eff, status)
