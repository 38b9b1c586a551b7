"""The warm-started refresh: block Krylov from the installed eigenvectors, with Rayleigh–Ritz.

The first refresh has nothing to start from and runs Lanczos (:mod:`dho2_tf.curvature.lanczos`).
Every later one starts from the eigenvectors it installed last time, which are close to the new
ones when the weights moved little: :class:`BlockRitzProgram` multiplies the whole block of them
by the Hessian (one block HVP, one collective for the block), extends the subspace once with the
part of H̄X outside span(X), multiplies that block too, and takes the extreme Ritz pairs of H̄ on
the 2b-dimensional space span[X, H̄X] (block Lanczos with two blocks; Golub & Underwood, "The
block Lanczos method for computing eigenvalues", 1977; Saad, "Numerical Methods for Large
Eigenvalue Problems", 2nd ed., §6.2 and §4.3 for Rayleigh–Ritz). Repeated at every refresh it
is a restarted block Krylov method whose restart vectors are the previous Ritz vectors.

The first half (:meth:`BlockRitzProgram.check`) is also the staleness check of the adaptive
schedule (:mod:`dho2_tf.refresh_schedule`): the residuals of the best pairs in span(X) say how far
the installed eigenpairs are from the current Hessian's. When the check decides to refresh, the
refresh continues from it (:meth:`BlockRitzProgram.refine`) without repeating its block HVP.

:class:`CurvatureEstimator` puts both programs behind the estimator interface a refresh uses.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable, NamedTuple

import numpy as np
import tensorflow as tf

from dho2_tf.curvature.block_ops import BlockOps, block_hvp
from dho2_tf.curvature.lanczos import NON_FINITE
from dho2_tf.curvature.spectrum import (EigenEstimate, SpectrumEstimator, _empty_estimate,
                                        select_ritz_pairs)

if TYPE_CHECKING:
    from dho2_tf.distributed.comm import Communicator, Group

logger = logging.getLogger(__name__)

#: How a refresh after the first is computed (``refresh_method``), the default first.
REFRESH_METHODS = ("warm", "lanczos")


class WarmStart(NamedTuple):
    """What a warm refresh starts from (identical ``valid`` and ``eigenvalues`` on every rank).

    Attributes:
        rows_r: [K, s], this rank's columns of the installed eigenvectors V, in the estimator's
            basis layout (all n columns when it is replicated).
        valid: bool [K], which rows hold an eigenvector (the others are replaced by random
            directions).
        eigenvalues: float64 [K], the installed λ (the check measures how far they moved).
        residual: max_j ‖H̄v_j − λ_j v_j‖ when the pairs were installed (the level the check
            compares with; 0 when unknown).
    """

    rows_r: tf.Tensor
    valid: np.ndarray
    eigenvalues: np.ndarray
    residual: float = 0.0


class StalenessCheck(NamedTuple):
    """The first half of a warm refresh: one block HVP of the installed eigenvectors.

    Attributes:
        staleness: :func:`relative_staleness` of the K extreme Ritz pairs (θ_j, y_j) of H̄ in
            span(X), against the installed eigenvalues and residual; the same on every rank
            (from values broadcast by the group root). ``inf`` when not finite.
        ritz_values: θ, float64 [K] (ordered as :class:`EigenEstimate`).
        residuals: ‖H̄y_j − θ_j y_j‖, float64 [K].
        status: ``"ok"`` or ``"non-finite HVP in block 0"``.
        q0_r, h0_r: the orthonormalised block X and its reduced HVP H̄X (this rank's columns),
            kept for :meth:`BlockRitzProgram.refine`.
        projected: X H̄ Xᵀ, float64 [b, b] (identical on every rank).
        seed: the seed of the random rows.
    """

    staleness: float
    ritz_values: np.ndarray
    residuals: np.ndarray
    status: str
    q0_r: tf.Tensor
    h0_r: tf.Tensor
    projected: np.ndarray
    seed: int


def orthonormalizer(gram: np.ndarray, tol: float, floor: float = 0.0) -> np.ndarray:
    """C with C X orthonormal for rows X of Gram matrix ``gram`` = X Xᵀ [b, b] (float64).

    Math: X Xᵀ = U diag(d) Uᵀ;  C = diag(d_keep^{−½}) U_keepᵀ for the d_i > tol·max(d_max,
    ``floor``) (the other rows of C are zero: those directions are dropped), so
    (C X)(C X)ᵀ = I on the kept rows. Returns C [b, b], kept rows first.
    """
    gram = 0.5 * (gram + gram.T)
    d, u = np.linalg.eigh(gram)
    order = np.argsort(d)[::-1]
    d, u = d[order], u[:, order]
    keep = d > tol * max(float(d[0]), floor)
    keep &= d > 0.0
    c = np.zeros_like(gram)
    c[: int(keep.sum())] = (u[:, keep] / np.sqrt(d[keep])).T
    return c


def rayleigh_ritz(projected: np.ndarray, gram: np.ndarray, tol: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Ritz pairs of a symmetric operator on span(Q) from Q H Qᵀ and Q Qᵀ (float64).

    Math: with C = :func:`orthonormalizer` (Q Qᵀ) restricted to its r kept rows,
    C (Q H Qᵀ) Cᵀ = S diag(θ) Sᵀ (θ ascending); the Ritz vectors are y_j = (Sᵀ C)_j Q.

    Returns:
        θ [r] ascending and the coefficients W = (Sᵀ C)ᵀ [b, r], so y_j = W[:, j]ᵀ Q.
    """
    c = orthonormalizer(gram, tol)
    rank = int(np.count_nonzero(np.any(c != 0.0, axis=1)))
    c = c[:rank]
    reduced = c @ (0.5 * (projected + projected.T)) @ c.T
    theta, s = np.linalg.eigh(reduced)
    return theta, c.T @ s


def relative_staleness(ritz_values: np.ndarray, residuals: np.ndarray,
                       installed: np.ndarray, installed_residual: float = 0.0) -> float:
    """How far the installed pairs are from the current Hessian, relative to its scale.

    Math: θ_j, r_j = ‖H̄y_j − θ_j y_j‖ the Ritz pairs of the current H̄ in span(V), λ_j the
    installed eigenvalues, r₀ the largest residual when they were installed::

        s = max(max_j |θ_j − λ_j|, max_j r_j − r₀) / max_j |θ_j|

    The first term is the drift of the curvature the Newton step uses (η = 1/λ), the second the
    growth of the part of H̄V outside span(V) (the eigenvectors turning away); both are 0 at the
    weights of the refresh. ``inf`` when not finite or θ = 0.
    """
    scale = float(np.max(np.abs(ritz_values))) if ritz_values.size else 0.0
    worst = max(float(np.max(residuals)) - installed_residual,
                float(np.max(np.abs(ritz_values - installed))))
    if not np.isfinite(worst) or scale == 0.0:
        return float("inf")
    return worst / scale


class BlockRitzProgram:
    """Rayleigh–Ritz on span[X, H̄X] for a start block X, one collective per block HVP.

    Math:
        X [b, n] = the K installed eigenvectors (invalid rows replaced by random directions) and
        p extra random directions, b = K + p; H̄ = mean_r H_r (or the root's, ``"root0"``). All
        small matrices are float64 and identical on every rank (broadcast from the group root)::

            Q₀ = C₀ X            C₀ = orthonormalizer(X Xᵀ)              (one allreduce)
            H₀ = H̄ Q₀                                                   (block HVP 0)
            A  = sym(Q₀ H₀ᵀ)                         (with H₀H₀ᵀ, Q₀Q₀ᵀ: one allreduce)
            W  = H₀ − A Q₀ ;  [c ; N] = [W Q₀ᵀ ; W Wᵀ]                    (one allreduce)
            Q₁ = C₁ (W − c Q₀)   C₁ = orthonormalizer(N − c cᵀ)
            H₁ = H̄ Q₁                                                   (block HVP 1)
            Q = [Q₀ ; Q₁],  H = [H₀ ; H₁] ;  T = sym(Q Hᵀ), M = Q Qᵀ     (one allreduce)
            Ritz pairs (θ_j, w_j) of (T, M) (:func:`rayleigh_ritz`) ; the ℓ smallest and k largest
            V = Wᵀ Q ;  R = Wᵀ H − diag(θ) V ;  [Γ ; ‖R_j‖²] = [V Vᵀ ; row norms]  (one allreduce)

        2b HVPs in two block products; the residuals ‖H̄v_j − θ_j v_j‖ come with no extra HVP.
        Since W = H₀ − A Q₀ spans the part of H̄ span(Q₀) outside span(Q₀), span(Q) = span[X, H̄X],
        the block Krylov space of depth 2. Directions whose squared norm is below
        ``tol``·max (the machine epsilon of the basis dtype) are dropped, so a block that is
        (numerically) invariant, or a rank-deficient start, gives fewer Ritz pairs, never
        non-finite ones.

    The staleness check (:meth:`check`) is the first two lines plus the Rayleigh–Ritz of span(Q₀)
    and its residuals, ‖H̄y_j − θ_j y_j‖² = w_jᵀ (H₀H₀ᵀ) w_j − θ_j² (one block HVP).
    Every rank issues the same collectives in the same order; stop decisions (non-finite HVPs)
    use only reduced values.

    Args:
        hvp_fn: ``hvp_fn(v: hvp_dtype [n]) -> [n]``, this rank's Hessian-vector product.
        n: length of the flat parameter vector.
        k: number of largest pairs, ≥ 1. ell: number of smallest pairs, ≥ 0.
        comm: communicator.
        extra: p, random directions added to the K eigenvectors (≥ 0).
        process_set, hvp_dtype, basis_dtype, basis_layout, hvp_reduce: as
            :class:`~dho2_tf.curvature.lanczos.LanczosProgram`.
        batching: how a block of HVPs is computed (:func:`~dho2_tf.curvature.block_ops.block_hvp`).
        name: prefix of the collective names.
    """

    def __init__(self, hvp_fn: Callable[[tf.Tensor], tf.Tensor], n: int, k: int, ell: int,
                 comm: Communicator, *, extra: int = 0, process_set: Group | None = None,
                 hvp_dtype: tf.DType = tf.float32, basis_dtype: str | tf.DType = "float64",
                 basis_layout: str = "sharded", hvp_reduce: str = "mean",
                 batching: str = "map", name: str = "dho2/warm") -> None:
        self.hvp_fn, self.n, self.k, self.ell, self.comm = hvp_fn, n, k, ell, comm
        self.num_pairs, self.extra, self.block = k + ell, extra, k + ell + extra
        self.basis_dtype = tf.as_dtype(basis_dtype)
        self.batching, self.name = batching, name
        self.ops = BlockOps(n, comm, process_set, hvp_dtype, self.basis_dtype, basis_layout,
                            hvp_reduce, name)
        self.tol = float(np.finfo(self.basis_dtype.as_numpy_dtype).eps)
        self._product = tf.function(self._block_product, autograph=False, input_signature=[
            tf.TensorSpec([self.block, self.ops.layout.shard_size], self.basis_dtype)])
        self.trace_seconds: float | None = None

    @property
    def hvps_per_refresh(self) -> int:
        """Hessian-vector products of one warm refresh: 2b."""
        return 2 * self.block

    def _block_product(self, q_r: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(H̄ Q)_r [b, s] and this rank's count of its non-finite entries (one collective for
        the block's HVPs, plus the gather of the block with a sharded basis)."""
        h = block_hvp(self.hvp_fn, self.ops.gather_rows(q_r), self.batching)
        h_r = self.ops.reduce_rows(h)
        return h_r, tf.cast(tf.math.count_nonzero(~tf.math.is_finite(h_r)), tf.float64)

    def trace(self) -> float:
        """Trace the block product (no HVP runs, no collective); seconds of the first call."""
        if self.trace_seconds is None:
            start = time.perf_counter()
            self._product.get_concrete_function()
            self.trace_seconds = time.perf_counter() - start
        return self.trace_seconds

    # ------------------------------------------------------------------ pieces
    def _start_rows(self, start: WarmStart, seed: int) -> tf.Tensor:
        """X_r [b, s]: the valid rows of V, random directions for the others and the extra."""
        rows = tf.cast(start.rows_r, self.basis_dtype)
        missing = [j for j in range(self.num_pairs) if not start.valid[j]]
        count = len(missing) + self.extra
        if count == 0:
            return rows
        random = np.random.default_rng(seed).standard_normal((count, self.n))
        random /= np.linalg.norm(random, axis=1, keepdims=True)
        random_r = tf.cast(self.ops.local_rows(tf.constant(random)), self.basis_dtype)
        if missing:
            rows = tf.tensor_scatter_nd_update(rows, [[j] for j in missing],
                                               random_r[: len(missing)])
        return tf.concat([rows, random_r[len(missing):]], 0)

    def _project(self, parts: list[tf.Tensor], purpose: str) -> list[np.ndarray]:
        """Σ over the shards of the products in ``parts``, then broadcast from the group root:
        float64 arrays identical on every rank (two collectives for the whole list)."""
        flat = tf.concat([tf.reshape(tf.cast(p, tf.float64), [-1]) for p in parts], 0)
        flat = self.ops.broadcast(self.ops.project(flat, purpose), f"{purpose}_bc").numpy()
        out, at = [], 0
        for p in parts:
            size = int(np.prod(p.shape))
            out.append(flat[at: at + size].reshape(p.shape))
            at += size
        return out

    @staticmethod
    def _gram(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
        return tf.matmul(a, b, transpose_b=True)

    # ------------------------------------------------------------------ entry points
    def check(self, start: WarmStart, seed: int) -> StalenessCheck:
        """The Ritz pairs of H̄ in span(X) and their residuals: K + p HVPs (one block).

        Every rank of the group calls it.
        """
        self.trace()
        x_r = self._start_rows(start, seed)
        (gram,) = self._project([self._gram(x_r, x_r)], "x_gram")
        q0_r = tf.matmul(tf.constant(orthonormalizer(gram, self.tol), x_r.dtype), x_r)
        h0_r, bad = self._product(q0_r)
        projected, hh, qq, bad = self._project(
            [self._gram(q0_r, h0_r), self._gram(h0_r, h0_r), self._gram(q0_r, q0_r),
             tf.reshape(bad, [1])], "block0")
        empty = np.zeros(self.num_pairs)
        if bad[0] > 0 or not np.all(np.isfinite(projected)):
            return StalenessCheck(float("inf"), empty, empty, f"{NON_FINITE} HVP in block 0",
                                  q0_r, h0_r, projected, seed)
        theta, w = rayleigh_ritz(projected, qq, self.tol)
        values, coeffs, _ = select_ritz_pairs(theta, np.eye(len(theta)), self.k, self.ell)
        w_sel = w @ coeffs.T                                     # [b, K]
        hh = 0.5 * (hh + hh.T)
        squares = np.einsum("ij,ik,kj->j", w_sel, hh, w_sel) - values ** 2
        residuals = np.sqrt(np.maximum(squares, 0.0))
        return StalenessCheck(relative_staleness(values, residuals, start.eigenvalues,
                                                 start.residual), values,
                              residuals, "ok", q0_r, h0_r, projected, seed)

    def refine(self, check: StalenessCheck) -> EigenEstimate:
        """The extreme Ritz pairs on span[X, H̄X], continuing ``check``: K + p more HVPs."""
        s = self.ops.layout.shard_size
        if check.status != "ok":
            return _empty_estimate(self.k, self.ell, s, check.status)._replace(
                hvps=self.block, warm=True)
        q0_r, h0_r = check.q0_r, check.h0_r
        dtype = q0_r.dtype
        a = 0.5 * (check.projected + check.projected.T)
        w_r = h0_r - tf.matmul(tf.constant(a, dtype), q0_r)
        c, nn = self._project([self._gram(w_r, q0_r), self._gram(w_r, w_r)], "block1")
        w_r = w_r - tf.matmul(tf.constant(c, dtype), q0_r)
        # Residual directions below √tol·max|θ| are converged ones: drop them.
        c1 = orthonormalizer(nn - c @ c.T, self.tol, floor=float(np.max(np.abs(a))) ** 2)
        q1_r = tf.matmul(tf.constant(c1, dtype), w_r)
        h1_r, bad = self._product(q1_r)
        q_r, h_r = tf.concat([q0_r, q1_r], 0), tf.concat([h0_r, h1_r], 0)
        projected, gram, bad = self._project(
            [self._gram(q_r, h_r), self._gram(q_r, q_r), tf.reshape(bad, [1])], "block2")
        hvps = 2 * self.block
        if bad[0] > 0 or not np.all(np.isfinite(projected)):
            return _empty_estimate(self.k, self.ell, s, f"{NON_FINITE} HVP in block 1")._replace(
                hvps=hvps, warm=True)
        theta, w = rayleigh_ritz(projected, gram, self.tol)
        values, coeffs, num_valid = select_ritz_pairs(theta, np.eye(len(theta)), self.k,
                                                      self.ell)
        w_sel = tf.constant((w @ coeffs.T).T, dtype)      # [K, 2b]
        vectors_r = tf.matmul(w_sel, q_r)
        residual_r = tf.matmul(w_sel, h_r) - tf.constant(values, dtype)[:, None] * vectors_r
        gram_v, res2 = self._project([self._gram(vectors_r, vectors_r),
                                      tf.reduce_sum(tf.square(residual_r), 1)], "ritz")
        logger.debug("warm refresh: Ritz values %s, residuals %s", values, np.sqrt(res2))
        return EigenEstimate(tf.constant(values, tf.float32), tf.cast(vectors_r, tf.float32),
                             tf.constant(gram_v, tf.float32), num_valid, "ok",
                             residuals=np.sqrt(np.maximum(res2, 0.0)), hvps=hvps, warm=True)

    def estimate(self, start: WarmStart, seed: int) -> EigenEstimate:
        """:meth:`check` then :meth:`refine`: 2(K + p) HVPs in two block products."""
        return self.refine(self.check(start, seed))


class CurvatureEstimator:
    """The estimator of one binding: Lanczos for a cold start, the block program when warm.

    Args:
        lanczos: the compiled :class:`~dho2_tf.curvature.spectrum.SpectrumEstimator`.
        block: the :class:`BlockRitzProgram` (``None``: every refresh runs Lanczos and no
            staleness check is possible).

    Attributes:
        last: the :class:`WarmStart` of the last estimate with valid pairs (for ranks that keep
            no optimizer state, e.g. the pipelined curvature ranks), or ``None``.
    """

    def __init__(self, lanczos: SpectrumEstimator, block: BlockRitzProgram | None) -> None:
        self.lanczos, self.block = lanczos, block
        self.last: WarmStart | None = None

    @property
    def program(self):
        """The Lanczos program (its ``n``, ``m``, basis dtype and layout)."""
        return self.lanczos.program

    @property
    def basis_layout(self) -> str:
        return self.lanczos.basis_layout

    @property
    def basis_dtype(self) -> tf.DType:
        """The dtype the basis and the Ritz vectors are computed in (one per binding)."""
        return self.lanczos.program.basis_dtype

    @property
    def layout(self):
        """This rank's columns of the basis (:class:`~dho2_tf.distributed.sharding.ShardLayout`)."""
        return self.lanczos.program.layout

    def trace(self) -> float:
        """Compile the Lanczos program and the block product; seconds."""
        return self.lanczos.trace() + (self.block.trace() if self.block is not None else 0.0)

    def estimate(self, seed: int, start: WarmStart | None = None,
                 check: StalenessCheck | None = None) -> EigenEstimate:
        """The extreme eigenpairs at the current weights: continuing ``check`` when given, warm
        from ``start`` when given (and a block program exists), else Lanczos from ``seed``."""
        if check is not None:
            est = self.block.refine(check)
        elif start is not None and self.block is not None and bool(np.any(start.valid)):
            est = self.block.estimate(start, seed)
        else:
            est = self.lanczos.estimate(seed)
        if est.num_valid > 0 and not est.status.startswith(NON_FINITE):
            self.last = WarmStart(est.vectors_r, np.diag(est.gram.numpy()) > 0.5,
                                  est.eigenvalues.numpy().astype(np.float64),
                                  float(np.max(est.residuals)))
        return est

    def check(self, start: WarmStart, seed: int) -> StalenessCheck:
        """The staleness check of ``start`` (see :meth:`BlockRitzProgram.check`)."""
        if self.block is None:
            raise RuntimeError("no block program: the staleness check needs refresh_method="
                               "'warm' or an adaptive schedule")
        return self.block.check(start, seed)
