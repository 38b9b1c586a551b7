"""Lanczos with full re-orthogonalisation as one compiled graph, basis sharded or replicated.

:class:`LanczosProgram` holds the whole iteration (m Hessian-vector products, their reduction
over the ranks, the re-orthogonalisation, the norm and the next vector) in one ``tf.function``
whose collectives are graph ops. It is traced once per operator and reused by every later
refresh; the basis lives in a preallocated variable, so a refresh allocates nothing
parameter-sized. :func:`lanczos` is the one-shot convenience wrapper.

Basis layouts over the P ranks of a group (every vector is a flat parameter-space vector):

* ``"sharded"``: rank r keeps Q_r, its ⌈n/P⌉ columns of the basis (1/P memory). Per iteration:
  reduce-scatter of the HVP, one allreduce of two numbers [q_i·h ; #non-finite], one allreduce
  of [Q_r w_r ; ‖w_r‖²] (i + 2 numbers) and one all-gather of the next vector (the
  reduce-scatter and the all-gather move what one allreduce of the HVP would).
* ``"replicated"``: every rank keeps the whole basis. Per iteration: one allreduce of the HVP;
  everything else is local and identical on every rank.

With one rank both are the same computation without collectives.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable, NamedTuple

import numpy as np
import tensorflow as tf

from dho2_tf.curvature.block_ops import BlockOps, group_root
from dho2_tf.validation import check_int

if TYPE_CHECKING:
    from dho2_tf.distributed.comm import Communicator, Group

logger = logging.getLogger(__name__)

NON_FINITE = "non-finite"
BREAKDOWN = "breakdown"
HVP_REDUCTIONS = ("mean", "root0")
BASIS_LAYOUTS = ("sharded", "replicated")
BASIS_DTYPES = ("float64", "float32")

# Status codes of the compiled loop (``_STATUS`` formats them).
_RUNNING, _OK, _NONFINITE_HVP, _NONFINITE_BETA, _BREAKDOWN = 0, 1, 2, 3, 4
_STATUS = {_OK: "ok", _NONFINITE_HVP: f"{NON_FINITE} HVP at step {{}}",
           _NONFINITE_BETA: f"{NON_FINITE} beta at step {{}}",
           _BREAKDOWN: f"{BREAKDOWN} at step {{}}"}


class LanczosResult(NamedTuple):
    """Output of a Lanczos run.

    Attributes:
        tridiagonal: T, float64 [m_eff, m_eff]; identical on every rank of the group (broadcast
            from the group root). Not broadcast when ``status`` is non-finite.
        basis_r: Q_r, [m_eff, s] in the basis dtype; this rank's columns of the orthonormal
            basis Q (all n columns with the replicated layout).
        num_steps: m_eff, the number of basis vectors (m unless the iteration stopped early).
        status: ``"ok"``, ``"breakdown at step i"`` or ``"non-finite <what> at step i"``.
        next_beta: β_{m_eff−1}, the norm of the last residual vector (0 when unknown); the Ritz
            pair (θ_j, Q s_j) has the residual ‖H̄y − θ_j y‖ = β_{m_eff−1}·|s_{m_eff−1, j}|
            (Golub & Van Loan, §10.1.4).
    """

    tridiagonal: tf.Tensor
    basis_r: tf.Tensor
    num_steps: int
    status: str
    next_beta: float = 0.0


def start_vector(n: int, seed: int) -> np.ndarray:
    """q₀ = z/‖z‖ with z ~ N(0, I_n) drawn by ``np.random.default_rng(seed)`` (float64)."""
    q0 = np.random.default_rng(seed).standard_normal(n)
    return q0 / np.linalg.norm(q0)


def tridiagonal(alphas: np.ndarray, betas: np.ndarray, m_eff: int) -> np.ndarray:
    """T [m_eff, m_eff] with diagonal α_0…α_{m_eff−1} and off-diagonals β_0…β_{m_eff−2}."""
    t = np.diag(np.asarray(alphas[:m_eff], np.float64))
    off = np.asarray(betas[:max(m_eff - 1, 0)], np.float64)
    return t + np.diag(off, 1) + np.diag(off, -1)


def check_arguments(n: int, m: int, hvp_reduce: str, breakdown_tol: float,
                    basis_layout: str = "sharded", basis_dtype: str = "float64") -> None:
    """Raise ValueError for arguments no Lanczos run accepts (see :class:`LanczosProgram`)."""
    check_int("n", n, minimum=1)
    check_int("m", m, minimum=1)
    if hvp_reduce not in HVP_REDUCTIONS:
        raise ValueError(f"`hvp_reduce` must be one of {HVP_REDUCTIONS}. "
                         f"Received: hvp_reduce={hvp_reduce!r}")
    if basis_layout not in BASIS_LAYOUTS:
        raise ValueError(f"`basis_layout` must be one of {BASIS_LAYOUTS}. "
                         f"Received: basis_layout={basis_layout!r}")
    if tf.as_dtype(basis_dtype).name not in BASIS_DTYPES:
        raise ValueError(f"`basis_dtype` must be one of {BASIS_DTYPES}. "
                         f"Received: basis_dtype={basis_dtype!r}")
    if not breakdown_tol >= 0.0:
        raise ValueError(
            f"`breakdown_tol` must be non-negative. Received: breakdown_tol={breakdown_tol}")


class LanczosProgram:
    """m steps of Lanczos on the rank-averaged Hessian, compiled once and run per refresh.

    Math:
        H_r is ``hvp_fn`` on rank r (its own batch), H̄ = (1/P) Σ_r H_r over the P ranks of
        ``process_set``; Q_r this rank's columns of the basis (all columns when replicated),
        restricted to its filled rows 0…i; m = ``m``; ε = ``breakdown_tol``. Per step
        i = 0…m−1 — the three-term recurrence followed by one full classical Gram-Schmidt
        re-orthogonalisation, whose norm comes from the same reduction::

            h_r = shard of H̄ q_i                                   (the HVP reduction)
            α_i = Σ_r q_{i,r}·h_r ;  T_ii = α_i
            w_r = h_r − α_i q_{i,r} − β_{i−1} q_{i−1,r}              (β_{−1} = 0)
            [c ; ν] = Σ_r [Q_r w_r ; ‖w_r‖²]
            w_r ← w_r − Q_rᵀ c ;  β_i = (ν − ‖c‖²)^½      (‖w − Qᵀc‖² = ν − ‖c‖² for QQᵀ = I)
            stop if β_i ≤ ε · max(1, max_j |T_jj|)
            T_{i,i+1} = T_{i+1,i} = β_i ;  q_{i+1} = w/β_i

        with q₀ from :func:`start_vector` (``seed``), broadcast from the group root. Then
        Q T Qᵀ ≈ H̄ restricted to the Krylov space K_m(H̄, q₀) and Q Qᵀ = I_{m_eff}
        (Lanczos 1950; full re-orthogonalisation: Golub & Van Loan, "Matrix Computations",
        4th ed., §10.3.1; the recurrence has already removed the large components, so one
        Gram-Schmidt pass leaves w orthogonal to Q to rounding; FOSI, Sivan et al.,
        ICLR 2024, §3, for the use of the extreme Ritz pairs).

    Cost per step: one HVP and two passes over the filled rows of Q_r (c = Q_r w and
    Q_rᵀ c); the basis is written in place, one row per step. Stop decisions use only
    all-reduced values, so every rank issues the same collectives in the same order. The loop
    is a ``tf.while_loop`` with the collectives as graph ops; :meth:`trace` compiles it (and the
    HVP inside it) without running an HVP, so the one-off cost can be paid and reported when
    the optimizer is bound.

    Args:
        hvp_fn: ``hvp_fn(v: hvp_dtype [n]) -> [n]``, this rank's Hessian-vector product. It is
            traced into the graph, so it must be expressible as TensorFlow ops.
        n: length of the flat parameter vector.
        m: Lanczos order (number of HVPs at most).
        comm: communicator.
        process_set: group running the iteration; ``None`` for all ranks.
        hvp_dtype: dtype of the vectors handed to ``hvp_fn`` and of the HVP reduction.
            Defaults to ``tf.float32``.
        basis_dtype: ``"float64"`` (default) or ``"float32"``: storage and arithmetic of the
            basis vectors. Coefficients and T are always float64.
        basis_layout: ``"sharded"`` (default) or ``"replicated"`` (see the module docstring).
        hvp_reduce: ``"mean"`` (H̄ = mean of the ranks' Hessians) or ``"root0"`` (every rank
            adopts the group root's H_r, as the released DHO2 code does).
        breakdown_tol: ε. Defaults to 1e-10.
        name: prefix of the collective names.

    Raises:
        ValueError: for a non-positive ``n``/``m``, an unknown ``hvp_reduce``,
            ``basis_layout`` or ``basis_dtype``, or a negative ``breakdown_tol``.
    """

    def __init__(self, hvp_fn: Callable[[tf.Tensor], tf.Tensor], n: int, m: int,
                 comm: Communicator, *, process_set: Group | None = None,
                 hvp_dtype: tf.DType = tf.float32, basis_dtype: str | tf.DType = "float64",
                 basis_layout: str = "sharded", hvp_reduce: str = "mean",
                 breakdown_tol: float = 1e-10, name: str = "dho2/lanczos") -> None:
        check_arguments(n, m, hvp_reduce, breakdown_tol, basis_layout, basis_dtype)
        self.hvp_fn, self.n, self.m, self.comm = hvp_fn, n, m, comm
        self.process_set, self.hvp_dtype = process_set, tf.as_dtype(hvp_dtype)
        self.basis_dtype = tf.as_dtype(basis_dtype)
        self.basis_layout, self.hvp_reduce = basis_layout, hvp_reduce
        self.breakdown_tol, self.name = float(breakdown_tol), name
        self.ops = BlockOps(n, comm, process_set, self.hvp_dtype, self.basis_dtype,
                            basis_layout, hvp_reduce, name)
        self.layout, self.proj_comm, self.proj_set = (self.ops.layout, self.ops.proj_comm,
                                                      self.ops.proj_set)
        self._run = tf.function(self._graph, autograph=False, input_signature=[
            tf.TensorSpec([n], tf.float64), tf.TensorSpec([], tf.int32)])
        self.trace_seconds: float | None = None

    # ---------------------------------------------------------------- graph pieces
    def _reduce_hvp(self, h: tf.Tensor) -> tf.Tensor:
        """This rank's shard of the reduced HVP, in the basis dtype."""
        return tf.reshape(self.ops.reduce_rows(tf.reshape(h, [1, self.n])),
                          [self.layout.shard_size])

    def _gather(self, q_r: tf.Tensor) -> tf.Tensor:
        """The full next vector for the HVP, in ``hvp_dtype`` [n]."""
        return tf.reshape(self.ops.gather_rows(q_r[None]), [self.n])

    def _project(self, x: tf.Tensor, purpose: str) -> tf.Tensor:
        """Σ over the shards of a small vector (identity with a replicated basis)."""
        return self.ops.project(x, purpose)

    def _graph(self, q0: tf.Tensor, steps: tf.Tensor):
        """The compiled iteration: (Q_r [m+1, s], α [m], β [m], m_eff, status, stop step).

        ``steps`` < m stops early (``steps`` ≤ 0 only compiles: no HVP, no collective).
        """
        m, bdt, f64 = self.m, self.basis_dtype, tf.float64
        q0 = tf.cond(steps > 0, lambda: self.comm.broadcast(
            q0, group_root(self.process_set), name=f"{self.name}/q0",
            process_set=self.process_set), lambda: q0)
        # Rows are written in place (each row once, before it is first read), so a refresh
        # moves no basis-sized data besides its passes. One spare row takes the last step's
        # unused next vector, so the loop body needs no branch.
        basis = tf.raw_ops.Empty(shape=[m + 1, self.layout.shard_size], dtype=bdt, init=False)
        basis = tf.raw_ops.InplaceUpdate(x=basis, i=[0],
                                         v=tf.cast(self.layout.local(q0), bdt)[None])
        tol = tf.constant(self.breakdown_tol, f64)

        def keep_going(i, q, basis, alphas, betas, m_eff, code, at):
            return (i < steps) & tf.equal(code, _RUNNING)

        def step(i, q, basis, alphas, betas, m_eff, code, at):
            h_r = self._reduce_hvp(self.hvp_fn(q))
            q_i, q_prev = basis[i], basis[tf.maximum(i - 1, 0)]
            beta_prev = tf.cast(tf.where(i > 0, betas[tf.maximum(i - 1, 0)], 0.0), bdt)
            bad_h = tf.cast(tf.math.count_nonzero(~tf.math.is_finite(h_r)), bdt)
            first = self._project(tf.stack([tf.reduce_sum(q_i * h_r), bad_h]), "alpha")
            alpha = first[0]
            hvp_bad = (first[1] > 0) | ~tf.math.is_finite(alpha)
            w = h_r - alpha * q_i - beta_prev * q_prev
            filled = basis[: i + 1]
            second = self._project(tf.concat([tf.linalg.matvec(filled, w),
                                              [tf.reduce_sum(tf.square(w))]], 0), "reorth")
            c = second[:-1]
            w = w - tf.linalg.matvec(filled, c, transpose_a=True)
            beta = tf.sqrt(tf.maximum(tf.cast(second[-1], f64)
                                      - tf.reduce_sum(tf.square(tf.cast(c, f64))), 0.0))
            alphas = tf.tensor_scatter_nd_update(alphas, [[i]], [tf.cast(alpha, f64)])
            scale = tf.maximum(tf.constant(1.0, f64), tf.reduce_max(tf.abs(alphas[: i + 1])))
            last, beta_bad = tf.equal(i, m - 1), ~tf.math.is_finite(beta)
            broke = beta <= tol * scale
            new_code = tf.where(hvp_bad, _NONFINITE_HVP, tf.where(last, _OK, tf.where(
                beta_bad, _NONFINITE_BETA, tf.where(broke, _BREAKDOWN, _RUNNING))))
            new_m_eff = tf.where(hvp_bad | (beta_bad & ~last), i,
                                 tf.where(last, m, tf.where(broke, i + 1, m_eff)))
            betas = tf.tensor_scatter_nd_update(betas, [[i]], [beta])
            q_next_r = w / tf.cast(beta, bdt)
            basis = tf.raw_ops.InplaceUpdate(x=basis, i=[i + 1], v=q_next_r[None])
            return (i + 1, self._gather(q_next_r), basis, alphas, betas, new_m_eff, new_code, i)

        zero = tf.constant(0, tf.int32)
        start = (zero, tf.cast(q0, self.hvp_dtype), basis, tf.zeros([m], f64),
                 tf.zeros([m], f64), tf.constant(m, tf.int32), tf.constant(_RUNNING, tf.int32),
                 zero)
        _, _, basis, alphas, betas, m_eff, code, at = tf.while_loop(
            keep_going, step, start, parallel_iterations=1)
        return basis, alphas, betas, m_eff, code, at

    # ---------------------------------------------------------------- eager entry points
    def trace(self) -> float:
        """Compile the program (and the HVP inside it) without running it; returns seconds.

        Runs no HVP and issues no collective, so any subset of ranks may call it. Later
        calls return the first call's time.
        """
        if self.trace_seconds is None:
            start = time.perf_counter()
            self._run(tf.zeros([self.n], tf.float64), tf.constant(0, tf.int32))
            self.trace_seconds = time.perf_counter() - start
            logger.debug("Lanczos program compiled in %.2fs (n=%d, m=%d, %s basis, %s)",
                         self.trace_seconds, self.n, self.m, self.basis_layout,
                         self.basis_dtype.name)
        return self.trace_seconds

    def run(self, seed: int) -> LanczosResult:
        """One Lanczos run from the start vector of ``seed`` (the same on every rank).

        Returns:
            A :class:`LanczosResult`. On a non-finite HVP or β the iteration stops,
            ``status`` starts with ``"non-finite"`` and the caller should keep its previous
            eigenpairs.
        """
        self.trace()
        basis, alphas, betas, m_eff, code, at = self._run(start_vector(self.n, seed),
                                                   tf.constant(self.m, tf.int32))
        m_eff, status = int(m_eff), _STATUS[int(code)].format(int(at))
        t = tridiagonal(alphas.numpy(), betas.numpy(), m_eff)
        if not status.startswith(NON_FINITE):
            t = self.comm.broadcast(tf.constant(t, tf.float64), group_root(self.process_set),
                                    name=f"{self.name}/tridiagonal",
                                    process_set=self.process_set).numpy()
        if status != "ok" and self.comm.rank == group_root(self.process_set):
            logger.warning("Lanczos stopped early (%s); m_eff=%d of m=%d.", status, m_eff,
                           self.m)
        logger.debug("Lanczos done: n=%d, m_eff=%d, status=%s", self.n, m_eff, status)
        next_beta = float(betas.numpy()[m_eff - 1]) if m_eff > 0 else 0.0
        return LanczosResult(tf.constant(t, tf.float64), basis[:m_eff], m_eff, status,
                             next_beta if np.isfinite(next_beta) else 0.0)


def lanczos(hvp_fn: Callable[[tf.Tensor], tf.Tensor], n: int, m: int, comm: Communicator, *,
            seed: int, process_set: Group | None = None, hvp_dtype: tf.DType = tf.float32,
            basis_dtype: str | tf.DType = "float64", basis_layout: str = "sharded",
            breakdown_tol: float = 1e-10, name: str = "dho2/lanczos",
            hvp_reduce: str = "mean") -> LanczosResult:
    """One Lanczos run: :class:`LanczosProgram` (see there for the maths and arguments),
    compiled for this call only. Refreshes that repeat should keep one program instead.

    Raises:
        ValueError: if ``n`` or ``m`` is not a positive integer, ``breakdown_tol`` < 0, or
            ``hvp_reduce``/``basis_layout``/``basis_dtype`` is unknown.
    """
    return LanczosProgram(hvp_fn, n, m, comm, process_set=process_set, hvp_dtype=hvp_dtype,
                          basis_dtype=basis_dtype, basis_layout=basis_layout,
                          hvp_reduce=hvp_reduce, breakdown_tol=breakdown_tol,
                          name=name).run(seed)
