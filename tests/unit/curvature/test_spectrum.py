"""T1/T3 (single process): extreme Ritz pairs against numpy.linalg.eigh on known spectra."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from dho2_tf.curvature import (estimate_spectrum, extreme_eigenpairs, gather_vectors, lanczos,
                               make_hvp_fn)
from dho2_tf.distributed import LocalComm

N, K_TOP, ELL = 500, 8, 2
# Known spectrum: 8 largest 100·0.8^j (100 … 20.97), bulk of 490 values uniform in [0, 1],
# 2 smallest −40 and −30; all extremes are well separated from the bulk.
TOP = 100.0 * 0.8 ** np.arange(K_TOP)
BOTTOM = np.array([-40.0, -30.0])


def _known_operator(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A = U diag(λ) Uᵀ; returns (A, λ ascending, U with matching columns)."""
    rng = np.random.default_rng(seed)
    lam = np.sort(np.concatenate([BOTTOM, rng.uniform(0.0, 1.0, N - K_TOP - ELL), TOP]))
    u, _ = np.linalg.qr(rng.standard_normal((N, N)))
    a = (u * lam) @ u.T
    return 0.5 * (a + a.T), lam, u


def _operator(a: np.ndarray):
    a_tf = tf.constant(a, tf.float64)
    return lambda v: tf.linalg.matvec(a_tf, v)


@pytest.fixture(scope="module")
def known() -> dict:
    a, lam, u = _known_operator()
    est = estimate_spectrum(_operator(a), N, K_TOP, ELL, LocalComm(), seed=11,
                            hvp_dtype=tf.float64)
    w, s = np.linalg.eigh(a)
    sel = np.r_[0:ELL, N - K_TOP:N]
    return dict(a=a, est=est, ref_values=w[sel], ref_vectors=s[:, sel].T, lam=lam)


def test_t1_extreme_ritz_values_match_eigh(known: dict) -> None:
    est = known["est"]
    assert est.status == "ok" and est.num_valid == K_TOP + ELL
    assert est.eigenvalues.dtype == tf.float32 and est.eigenvalues.shape == (K_TOP + ELL,)
    np.testing.assert_allclose(known["ref_values"], np.concatenate([BOTTOM, TOP[::-1]]),
                               rtol=1e-12)  # the stated spectrum, in [ℓ smallest ; k largest]
    np.testing.assert_allclose(est.eigenvalues.numpy(), known["ref_values"], rtol=1e-6)


def test_t1_ritz_vectors_align_with_true_eigenvectors(known: dict) -> None:
    v = known["est"].vectors_r.numpy().astype(np.float64)
    assert v.shape == (K_TOP + ELL, N)
    overlaps = np.abs(np.sum(v * known["ref_vectors"], axis=1))
    assert overlaps.min() >= 1.0 - 1e-6


def test_t3_ritz_vectors_orthonormal_and_gram_matches(known: dict) -> None:
    est = known["est"]
    v = est.vectors_r.numpy().astype(np.float64)
    assert np.abs(v @ v.T - np.eye(K_TOP + ELL)).max() <= 1e-6
    np.testing.assert_allclose(est.gram.numpy(), v @ v.T, atol=1e-6)
    full = gather_vectors(est.vectors_r, N, LocalComm()).numpy()
    np.testing.assert_array_equal(full, est.vectors_r.numpy())


def test_t3_basis_orthonormal_at_default_order(known: dict) -> None:
    res = lanczos(_operator(known["a"]), N, 4 * (K_TOP + ELL), LocalComm(), seed=11,
                  hvp_dtype=tf.float64)
    q = res.basis_r.numpy()
    assert q.shape == (40, N)
    assert np.abs(q @ q.T - np.eye(40)).max() <= 1e-10


def test_same_seed_is_deterministic(known: dict) -> None:
    again = estimate_spectrum(_operator(known["a"]), N, K_TOP, ELL, LocalComm(), seed=11,
                              hvp_dtype=tf.float64)
    np.testing.assert_array_equal(again.eigenvalues.numpy(), known["est"].eigenvalues.numpy())
    np.testing.assert_array_equal(again.vectors_r.numpy(), known["est"].vectors_r.numpy())


def test_ell_zero_gives_only_largest_in_ascending_order(known: dict) -> None:
    est = estimate_spectrum(_operator(known["a"]), N, 3, 0, LocalComm(), seed=2,
                            hvp_dtype=tf.float64)
    np.testing.assert_allclose(est.eigenvalues.numpy(), TOP[:3][::-1], rtol=1e-6)


def _rank_three() -> tuple[np.ndarray, np.ndarray]:
    u, _ = np.linalg.qr(np.random.default_rng(4).standard_normal((50, 50)))
    lam = np.concatenate([np.zeros(47), [1.0, 3.0, 5.0]])
    return (u * lam) @ u.T, u[:, -3:]


def test_breakdown_gives_exact_pairs() -> None:
    a, u = _rank_three()
    est = estimate_spectrum(_operator(a), 50, 3, 0, LocalComm(), m=10, seed=0,
                            hvp_dtype=tf.float64)
    assert est.status.startswith("breakdown") and est.num_valid == 3
    np.testing.assert_allclose(est.eigenvalues.numpy(), [1.0, 3.0, 5.0], rtol=1e-6)
    overlaps = np.abs(np.sum(est.vectors_r.numpy().astype(np.float64) * u.T, axis=1))
    assert overlaps.min() >= 1.0 - 1e-6


def test_fewer_steps_than_pairs_leaves_zero_slots_at_documented_places() -> None:
    a, _ = _rank_three()
    res = lanczos(_operator(a), 50, 10, LocalComm(), seed=0, hvp_dtype=tf.float64)
    assert res.num_steps == 4
    est = extreme_eigenpairs(res, 5, 2, LocalComm())
    # m_eff = 4 Ritz values {0, 1, 3, 5}: the 4 largest fill the top block's last 4 slots,
    # nothing is left for the smallest block.
    assert est.num_valid == 4
    np.testing.assert_allclose(est.eigenvalues.numpy(), [0, 0, 0, 0, 1, 3, 5], atol=1e-6)
    vectors = est.vectors_r.numpy()
    np.testing.assert_array_equal(vectors[:3], 0.0)
    assert np.all(np.linalg.norm(vectors[3:], axis=1) > 0.99)
    np.testing.assert_allclose(est.gram.numpy(), np.diag([0, 0, 0, 1, 1, 1, 1]), atol=1e-6)


def test_non_finite_hvp_returns_empty_estimate() -> None:
    est = estimate_spectrum(lambda v: v * np.nan, N, 2, 1, LocalComm(), seed=0)
    assert est.status.startswith("non-finite") and est.num_valid == 0
    assert est.eigenvalues.shape == (3,) and est.vectors_r.shape == (3, N)
    assert not np.any(est.eigenvalues.numpy()) and not np.any(est.vectors_r.numpy())


def test_t1_keras_logistic_regression_spectrum_matches_analytic_hessian() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 20)) * np.linspace(0.2, 3.0, 20)
    y = (x @ rng.standard_normal((20, 1)) > 0).astype(np.float64)
    model = tf.keras.Sequential([tf.keras.Input((20,), dtype="float64"),
                                 tf.keras.layers.Dense(1, dtype="float64")])
    loss_fn = tf.keras.losses.BinaryCrossentropy(from_logits=True)
    hvp = make_hvp_fn(model, loss_fn, (x, y), hvp_dtype=tf.float64)
    est = estimate_spectrum(hvp, 21, 2, 1, LocalComm(), m=21, seed=1, hvp_dtype=tf.float64)
    kernel, bias = model.get_weights()
    x_aug = np.hstack([x, np.ones((256, 1))])
    p = 1.0 / (1.0 + np.exp(-(x @ kernel + bias)[:, 0]))
    w = np.linalg.eigvalsh(x_aug.T @ (x_aug * (p * (1 - p))[:, None]) / 256)
    np.testing.assert_allclose(est.eigenvalues.numpy(), [w[0], w[-2], w[-1]], rtol=1e-5)


@pytest.mark.parametrize("kwargs,message", [
    (dict(k=0), "`k` must be a positive integer. Received: k=0"),
    (dict(k=-2), "`k` must be a positive integer. Received: k=-2"),
    (dict(ell=-1), "`ell` must be a non-negative integer. Received: ell=-1"),
    (dict(ell=1.0), "`ell` must be a non-negative integer. Received: ell=1.0"),
    (dict(m=0), "`m` must be a positive integer. Received: m=0"),
    (dict(m=9), "`m` must be at least `k` + `ell` = 10. Received: m=9, k=8, ell=2"),
])
def test_estimate_spectrum_validation_messages(kwargs: dict, message: str) -> None:
    args = dict(k=K_TOP, ell=ELL, m=None) | kwargs
    with pytest.raises(ValueError) as err:
        estimate_spectrum(lambda v: v, N, args["k"], args["ell"], LocalComm(), m=args["m"],
                          seed=0)
    assert str(err.value) == message


def test_extreme_eigenpairs_validation_message() -> None:
    res = lanczos(lambda v: 2.0 * v, 10, 2, LocalComm(), seed=0)
    with pytest.raises(ValueError, match="`k` must be a positive integer. Received: k=0"):
        extreme_eigenpairs(res, 0, 0, LocalComm())
