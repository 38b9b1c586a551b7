"""Extreme eigenpairs (Ritz pairs) from a sharded Lanczos run (reference §3.1, §4.2).

Eigenvalues are ordered as in reference §2: [ℓ smallest ascending ; k largest ascending], so the
last one is λ_max and index ℓ holds the k-th largest.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, NamedTuple

import numpy as np
import tensorflow as tf

from dho2_tf.curvature.lanczos import NON_FINITE, LanczosResult, lanczos
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
    """

    eigenvalues: tf.Tensor
    vectors_r: tf.Tensor
    gram: tf.Tensor
    num_valid: int
    status: str


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
        ℓ = ``ell``. With T = S diag(ϑ) Sᵀ, ϑ ascending (reference §3.1, §4.2):

            λ   = [ϑ_0 … ϑ_{ℓ−1} ; ϑ_{m−k} … ϑ_{m−1}]
            V_r = fp32(S[:, sel]ᵀ Q_r)          Γ = Σ_r V_r V_rᵀ

        The eigendecomposition is float64 and identical on all ranks because T was broadcast.

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
    slots = _ritz_slots(m_eff, k, ell)
    eigenvalues = np.zeros(k + ell)
    coefficients = np.zeros((m_eff, k + ell))
    for slot, j in enumerate(slots):
        if j is not None:
            eigenvalues[slot] = theta[j]
            coefficients[:, slot] = eigvecs[:, j]
    vectors_r = (coefficients.T @ result.basis_r.numpy()).astype(np.float32)
    local_gram = vectors_r.astype(np.float64) @ vectors_r.T.astype(np.float64)
    gram = comm.allreduce(tf.constant(local_gram, tf.float64), "sum", name=f"{name}/gram",
                          process_set=process_set)
    num_valid = sum(j is not None for j in slots)
    logger.debug("Ritz values (m_eff=%d, valid=%d): %s", m_eff, num_valid, eigenvalues)
    return EigenEstimate(tf.constant(eigenvalues, tf.float32), tf.constant(vectors_r),
                         tf.cast(gram, tf.float32), num_valid, result.status)


def estimate_spectrum(hvp_fn: Callable[[tf.Tensor], tf.Tensor], n: int, k: int, ell: int,
                      comm: Communicator, *, m: int | None = None, seed: int,
                      process_set: Group | None = None, hvp_dtype: tf.DType = tf.float32,
                      hvp_reduce: str = "mean") -> EigenEstimate:
    """Extreme Spectrum Estimation: Lanczos of order m, then the extreme Ritz pairs.

    Math:
        See :func:`dho2_tf.curvature.lanczos.lanczos` (T, Q of H̄ = mean_r H_r) and
        :func:`extreme_eigenpairs` (λ, V). Default m = 4(k + ℓ), the FOSI reference code's choice
        (reference §3.1; the paper's max(4K, 2 ln n) equals 4K for every K ≥ 10 and n < 1e9).

    Args:
        hvp_fn: ``hvp_fn(v: hvp_dtype [n]) -> [n]``, this rank's Hessian-vector product.
        n: length of the flat parameter vector.
        k: number of largest pairs, ≥ 1.
        ell: number of smallest pairs, ≥ 0.
        comm: communicator.
        m: Lanczos order, ≥ k + ℓ. Defaults to 4(k + ℓ).
        seed: seed of the Lanczos start vector (the same on every rank).
        process_set: group running the estimate; ``None`` for all ranks.
        hvp_dtype: dtype handed to ``hvp_fn``. Defaults to ``tf.float32``.
        hvp_reduce: ``"mean"`` or ``"root0"``, see :func:`dho2_tf.curvature.lanczos.lanczos`.

    Returns:
        An :class:`EigenEstimate`. A non-finite HVP gives ``num_valid=0`` and a ``status``
        starting with ``"non-finite"``: keep the previous eigenpairs.

    Raises:
        ValueError: if ``k``, ``ell`` or ``m`` is out of range (``m`` must be ≥ k + ℓ).
    """
    _check_k_ell(k, ell)
    if m is None:
        m = 4 * (k + ell)
    check_int("m", m, minimum=1)
    if m < k + ell:
        raise ValueError(
            f"`m` must be at least `k` + `ell` = {k + ell}. Received: m={m}, k={k}, ell={ell}")
    result = lanczos(hvp_fn, n, m, comm, seed=seed, process_set=process_set,
                     hvp_dtype=hvp_dtype, hvp_reduce=hvp_reduce)
    return extreme_eigenpairs(result, k, ell, comm, process_set=process_set)


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
