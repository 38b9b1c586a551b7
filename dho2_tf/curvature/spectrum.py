"""Extreme eigenpairs (Ritz pairs) from a Lanczos run, and the estimator a refresh keeps.

Eigenvalues are ordered [ℓ smallest ascending ; k largest ascending] throughout, so the
last one is λ_max and index ℓ holds the k-th largest.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, NamedTuple

import numpy as np
import tensorflow as tf

from dho2_tf.curvature.lanczos import NON_FINITE, LanczosProgram, LanczosResult
from dho2_tf.validation import check_int

if TYPE_CHECKING:
    from dho2_tf.distributed.comm import Communicator, Group

logger = logging.getLogger(__name__)


class EigenEstimate(NamedTuple):
    """Extreme eigenpairs of the (rank-averaged) Hessian, eigenvectors sharded by columns.

    Attributes:
        eigenvalues: λ, float32 [K], K = k + ℓ, ordered [ℓ smallest ascending ; k largest
            ascending]. Identical on every rank of the group.
        vectors_r: V_r, float32 [K, s]; this rank's columns of the eigenvector rows V.
        gram: Γ = Σ_r V_r V_rᵀ, float32 [K, K] (≈ I for the valid rows).
        num_valid: number of valid pairs. Fewer than K when the Lanczos run stopped before K
            steps; a missing pair has eigenvalue 0 and a zero row of V. Missing pairs are the
            *first* slots of the largest block (so λ_{K−1} stays λ_max) and the *last* slots of
            the smallest block. 0 when ``status`` is non-finite (keep the previous pairs then).
        status: the Lanczos status (``"ok"``, ``"breakdown at step i"``, ``"non-finite ..."``).
        residuals: ‖H̄ v_j − λ_j v_j‖, float64 [K] (0 for missing pairs), measured at no extra
            HVP (Lanczos: β_{m−1}|s_{m−1,j}| from T; the warm refresh: the block products);
            ``None`` when the estimate failed.
        hvps: Hessian-vector products the estimate computed (per rank).
        warm: whether the estimate was warm-started from the previous eigenvectors.
    """

    eigenvalues: tf.Tensor
    vectors_r: tf.Tensor
    gram: tf.Tensor
    num_valid: int
    status: str
    residuals: np.ndarray | None = None
    hvps: int = 0
    warm: bool = False


def _check_k_ell(k: int, ell: int) -> None:
    check_int("k", k, minimum=1)
    check_int("ell", ell, minimum=0)


def _ritz_slots(m_eff: int, k: int, ell: int) -> list[int | None]:
    """Index into the ascending Ritz values for each output slot (``None``: missing pair)."""
    k_eff = min(k, m_eff)
    ell_eff = min(ell, m_eff - k_eff)
    smallest = list(range(ell_eff)) + [None] * (ell - ell_eff)
    largest = [None] * (k - k_eff) + list(range(m_eff - k_eff, m_eff))
    return smallest + largest


def select_ritz_pairs(theta: np.ndarray, eigvecs: np.ndarray, k: int,
                      ell: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The ℓ smallest and k largest of the ascending Ritz values ``theta`` [m] and the columns
    of ``eigvecs`` [m, m] that go with them: (λ [K], coefficients [K, m], number valid).

    Missing pairs (m < K) get λ = 0 and a zero coefficient row (see :class:`EigenEstimate`).
    """
    m_eff = len(theta)
    slots = _ritz_slots(m_eff, k, ell)
    eigenvalues = np.zeros(k + ell)
    coefficients = np.zeros((k + ell, m_eff))
    for slot, j in enumerate(slots):
        if j is not None:
            eigenvalues[slot] = theta[j]
            coefficients[slot] = eigvecs[:, j]
    return eigenvalues, coefficients, sum(j is not None for j in slots)


def _empty_estimate(k: int, ell: int, s: int, status: str) -> EigenEstimate:
    big_k = k + ell
    return EigenEstimate(tf.zeros([big_k], tf.float32), tf.zeros([big_k, s], tf.float32),
                         tf.zeros([big_k, big_k], tf.float32), 0, status)


def extreme_eigenpairs(result: LanczosResult, k: int, ell: int, comm: Communicator, *,
                       process_set: Group | None = None,
                       name: str = "dho2/ritz") -> EigenEstimate:
    """The ℓ smallest and k largest Ritz pairs of a :class:`LanczosResult`.

    Math:
        T = ``result.tridiagonal`` (m×m, m = m_eff), Q_r = ``result.basis_r``, k = ``k``,
        ℓ = ``ell``. With T = S diag(ϑ) Sᵀ, ϑ ascending (Ritz pairs; FOSI §3):

            λ   = [ϑ_0 … ϑ_{ℓ−1} ; ϑ_{m−k} … ϑ_{m−1}]
            V_r = fp32(S[:, sel]ᵀ Q_r)          Γ = Σ_r V_r V_rᵀ

        The eigendecomposition is float64 and identical on all ranks because T was broadcast;
        V_r is formed in the basis dtype with one pass over Q_r. With a replicated basis pass
        a communicator whose collectives are local (``LocalComm``), since V_r is all of V.

    Args:
        result: output of :func:`dho2_tf.curvature.lanczos.lanczos` on this rank.
        k: number of largest pairs, ≥ 1.
        ell: number of smallest pairs, ≥ 0.
        comm: communicator (one allreduce, for Γ).
        process_set: the group that ran the Lanczos iteration; ``None`` for all ranks.
        name: prefix of the collective names.

    Returns:
        An :class:`EigenEstimate`; see its attributes for missing pairs (m_eff < k + ℓ). When the
        Lanczos status is non-finite no collective is issued (every rank agrees on the status)
        and an all-zero estimate with ``num_valid=0`` is returned.

    Raises:
        ValueError: if ``k`` is not a positive integer or ``ell`` a non-negative integer.
    """
    _check_k_ell(k, ell)
    m_eff = result.num_steps
    s = int(result.basis_r.shape[1])
    if result.status.startswith(NON_FINITE) or m_eff == 0:
        return _empty_estimate(k, ell, s, result.status)
    theta, eigvecs = np.linalg.eigh(result.tridiagonal.numpy())
    eigenvalues, coefficients, num_valid = select_ritz_pairs(theta, eigvecs, k, ell)
    residuals = np.abs(result.next_beta * coefficients[:, -1])   # ‖H̄v − λv‖ (Lanczos)
    basis_r = result.basis_r
    vectors_r = tf.matmul(tf.constant(coefficients, basis_r.dtype), basis_r)  # one pass over Q_r
    local_gram = tf.cast(tf.matmul(vectors_r, vectors_r, transpose_b=True), tf.float64)
    vectors_r = tf.cast(vectors_r, tf.float32)
    gram = comm.allreduce(local_gram, "sum", name=f"{name}/gram", process_set=process_set)
    logger.debug("Ritz values (m_eff=%d, valid=%d): %s", m_eff, num_valid, eigenvalues)
    return EigenEstimate(tf.constant(eigenvalues, tf.float32), vectors_r,
                         tf.cast(gram, tf.float32), num_valid, result.status, residuals)


class SpectrumEstimator:
    """Extreme Spectrum Estimation for one operator, compiled once and reused every refresh.

    Math:
        Lanczos of order m on H̄ = mean_r H_r (:class:`dho2_tf.curvature.lanczos.LanczosProgram`),
        then the extreme Ritz pairs (:func:`extreme_eigenpairs`). Default m = 4(k + ℓ), the FOSI
        reference code's choice (Sivan et al., ICLR 2024, §3: the paper's max(4K, 2 ln n)
        equals 4K for every K ≥ 10 and n < 1e9).

    Args:
        hvp_fn: ``hvp_fn(v: hvp_dtype [n]) -> [n]``, this rank's Hessian-vector product.
        n: length of the flat parameter vector.
        k: number of largest pairs, ≥ 1.
        ell: number of smallest pairs, ≥ 0.
        comm: communicator.
        m: Lanczos order, ≥ k + ℓ. Defaults to 4(k + ℓ).
        process_set: group running the estimate; ``None`` for all ranks.
        hvp_dtype: dtype handed to ``hvp_fn``. Defaults to ``tf.float32``.
        basis_dtype: ``"float64"`` or ``"float32"`` (default ``"float64"``), see
            :class:`~dho2_tf.curvature.lanczos.LanczosProgram`.
        basis_layout: ``"sharded"`` (V_r is this rank's columns) or ``"replicated"`` (every
            rank holds the whole basis and gets the whole V). Defaults to ``"sharded"``.
        hvp_reduce: ``"mean"`` or ``"root0"``, see ``LanczosProgram``.
        name: prefix of the collective names.

    Raises:
        ValueError: if ``k``, ``ell`` or ``m`` is out of range (``m`` must be ≥ k + ℓ), or a
            Lanczos argument is invalid.
    """

    def __init__(self, hvp_fn: Callable[[tf.Tensor], tf.Tensor], n: int, k: int, ell: int,
                 comm: Communicator, *, m: int | None = None, process_set: Group | None = None,
                 hvp_dtype: tf.DType = tf.float32, basis_dtype: str = "float64",
                 basis_layout: str = "sharded", hvp_reduce: str = "mean",
                 name: str = "dho2") -> None:
        _check_k_ell(k, ell)
        if m is None:
            m = 4 * (k + ell)
        check_int("m", m, minimum=1)
        if m < k + ell:
            raise ValueError(f"`m` must be at least `k` + `ell` = {k + ell}. "
                             f"Received: m={m}, k={k}, ell={ell}")
        self.k, self.ell, self.name = k, ell, name
        self.program = LanczosProgram(hvp_fn, n, m, comm, process_set=process_set,
                                      hvp_dtype=hvp_dtype, basis_dtype=basis_dtype,
                                      basis_layout=basis_layout, hvp_reduce=hvp_reduce,
                                      name=f"{name}/lanczos")

    @property
    def basis_layout(self) -> str:
        """``"sharded"`` or ``"replicated"``: whether ``vectors_r`` are columns or all of V."""
        return self.program.basis_layout

    def trace(self) -> float:
        """Compile the Lanczos program (no HVP, no collective); seconds of the first call."""
        return self.program.trace()

    def estimate(self, seed: int) -> EigenEstimate:
        """The extreme eigenpairs at the current weights, from the start vector of ``seed``.

        Every rank of the group calls it. A non-finite HVP gives ``num_valid=0`` and a
        ``status`` starting with ``"non-finite"``: keep the previous eigenpairs then.
        """
        result = self.program.run(seed)
        program = self.program
        est = extreme_eigenpairs(result, self.k, self.ell, program.proj_comm,
                                 process_set=program.proj_set, name=f"{self.name}/ritz")
        return est._replace(hvps=result.num_steps + int(result.status.startswith(NON_FINITE)))


def estimate_spectrum(hvp_fn: Callable[[tf.Tensor], tf.Tensor], n: int, k: int, ell: int,
                      comm: Communicator, *, m: int | None = None, seed: int,
                      process_set: Group | None = None, hvp_dtype: tf.DType = tf.float32,
                      hvp_reduce: str = "mean", basis_dtype: str = "float64",
                      basis_layout: str = "sharded") -> EigenEstimate:
    """One-shot :class:`SpectrumEstimator` (see there): compiles, estimates once, returns.

    Refreshes that repeat should keep one estimator, which compiles only once.
    """
    return SpectrumEstimator(hvp_fn, n, k, ell, comm, m=m, process_set=process_set,
                             hvp_dtype=hvp_dtype, basis_dtype=basis_dtype,
                             basis_layout=basis_layout, hvp_reduce=hvp_reduce).estimate(seed)


def gather_vectors(vectors_r: tf.Tensor, n: int, comm: Communicator,
                   process_set: Group | None = None, *,
                   name: str = "dho2/ritz/gather") -> tf.Tensor:
    """The full eigenvector rows V [K, n] from every rank's V_r [K, s].

    Math:
        V = unpad(allgather(V_rᵀ))ᵀ (shards concatenated in group-rank order along dimension 0).

    Args:
        vectors_r: float [K, s], this rank's columns.
        n: unpadded length.
        comm: communicator.
        process_set: the group holding the shards; ``None`` for all ranks.
        name: collective name.

    Returns:
        V, [K, n], same dtype as ``vectors_r``, identical on every rank of the group.
    """
    full = comm.allgather(tf.transpose(vectors_r), name=name, process_set=process_set)
    return tf.transpose(full[:n])
