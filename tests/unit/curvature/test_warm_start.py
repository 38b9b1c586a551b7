"""The warm-started block refresh against explicit Hessians (numpy eigh) of small models."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from dho2_tf.curvature import estimate_spectrum, make_hvp_fn
from dho2_tf.curvature.warm_start import (BlockRitzProgram, CurvatureEstimator, WarmStart,
                                          orthonormalizer)
from dho2_tf.curvature.spectrum import SpectrumEstimator
from dho2_tf.distributed import LocalComm

D, K_TOP, ELL = 12, 4, 1
LOSS = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _setup() -> dict:
    """A float64 12-8-3 tanh MLP (131 parameters) on 128 rows whose features have scales
    2·0.7^j (so the top of the spectrum is separated), its HVP and explicit Hessian."""
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([tf.keras.Input((D,)),
                                 tf.keras.layers.Dense(8, activation="tanh", dtype="float64"),
                                 tf.keras.layers.Dense(3, dtype="float64")])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, D)) * (2.0 * 0.7 ** np.arange(D))
    y = rng.integers(0, 3, 128)
    hvp = make_hvp_fn(model, LOSS, (x, y), hvp_dtype=tf.float64)
    n = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    return dict(model=model, x=x, y=y, hvp=hvp, n=n)


def _hessian(setup: dict) -> np.ndarray:
    """H from n HVPs with the unit vectors (symmetrised)."""
    h = np.stack([setup["hvp"](tf.constant(e)).numpy() for e in np.eye(setup["n"])])
    return 0.5 * (h + h.T)


def _extremes(h: np.ndarray) -> np.ndarray:
    w = np.linalg.eigvalsh(h)
    return np.concatenate([w[:ELL], w[len(w) - K_TOP:]])


def _sgd(setup: dict, steps: int, lr: float) -> None:
    opt = tf.keras.optimizers.SGD(lr)
    model = setup["model"]
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = LOSS(setup["y"], model(setup["x"]))
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                model.trainable_variables))


def _start(est) -> WarmStart:
    return WarmStart(est.vectors_r, np.diag(est.gram.numpy()) > 0.5,
                     est.eigenvalues.numpy().astype(np.float64))


@pytest.fixture(scope="module")
def moved() -> dict:
    """Lanczos pairs at θ₀, then 10 SGD steps to θ₁ and the explicit Hessian there."""
    setup = _setup()
    first = estimate_spectrum(setup["hvp"], setup["n"], K_TOP, ELL, LocalComm(), seed=0,
                              hvp_dtype=tf.float64)
    _sgd(setup, 10, 0.1)
    h = _hessian(setup)
    return dict(setup, first=first, h=h, exact=_extremes(h))


def _program(setup: dict, **kwargs) -> BlockRitzProgram:
    return BlockRitzProgram(setup["hvp"], setup["n"], K_TOP, ELL, LocalComm(),
                            hvp_dtype=tf.float64, **kwargs)


@pytest.mark.parametrize("batching", ["map", "vectorized"])
def test_warm_refresh_agrees_with_exact_eigenpairs_and_fresh_lanczos(moved: dict,
                                                                     batching: str) -> None:
    """Stated agreement after 10 SGD steps (lr 0.1) from the previous pairs: top-k and ℓ
    smallest Ritz values within 1% of max|λ| of eigh(H) and of a fresh full Lanczos (m = 4K),
    residuals ‖Hv − λv‖ ≤ 5% of max|λ| and equal to the explicit ones; 2K HVPs."""
    est = _program(moved, batching=batching).estimate(_start(moved["first"]), seed=3)
    exact, h = moved["exact"], moved["h"]
    scale = np.abs(exact).max()
    assert est.status == "ok" and est.num_valid == K_TOP + ELL and est.warm
    assert est.hvps == 2 * (K_TOP + ELL)
    values = est.eigenvalues.numpy().astype(np.float64)
    assert np.abs(values - exact).max() <= 1e-2 * scale
    fresh = estimate_spectrum(moved["hvp"], moved["n"], K_TOP, ELL, LocalComm(), seed=7,
                              hvp_dtype=tf.float64)
    assert np.abs(values - fresh.eigenvalues.numpy()).max() <= 1e-2 * scale
    v_fresh = fresh.vectors_r.numpy().astype(np.float64)
    lanczos_values = fresh.eigenvalues.numpy().astype(np.float64)
    np.testing.assert_allclose(   # Lanczos' residuals β|s_mj| are the explicit ones too
        fresh.residuals, np.linalg.norm(v_fresh @ h - lanczos_values[:, None] * v_fresh, axis=1),
        rtol=1e-3, atol=1e-6 * scale)
    v = est.vectors_r.numpy().astype(np.float64)
    explicit = np.linalg.norm(v @ h - values[:, None] * v, axis=1)
    np.testing.assert_allclose(est.residuals, explicit, rtol=1e-5, atol=1e-6 * scale)
    assert explicit.max() <= 5e-2 * scale
    np.testing.assert_allclose(est.gram.numpy(), np.eye(K_TOP + ELL), atol=1e-6)
    # Ritz values of a subspace lie inside the spectrum: the j-th largest never exceeds λ_j.
    assert np.all(values[ELL:] <= exact[ELL:] + 1e-9) and values[0] >= exact[0] - 1e-9


def test_repeated_warm_refreshes_converge_monotonically(moved: dict) -> None:
    """At fixed weights each warm refresh searches a space containing the previous Ritz
    vectors, so the largest Ritz values rise and the smallest falls towards eigh(H)
    (Courant–Fischer), and the error shrinks."""
    program = _program(moved)
    start, exact = _start(moved["first"]), moved["exact"]
    previous, errors = None, []
    for i in range(4):
        est = program.estimate(start, seed=i)
        values = est.eigenvalues.numpy().astype(np.float64)
        if previous is not None:
            assert np.all(values[ELL:] >= previous[ELL:] - 1e-7)
            assert values[0] <= previous[0] + 1e-7
        previous, start = values, _start(est)
        errors.append(np.abs(values - exact).max())
    assert errors[-1] < 0.5 * errors[0]


def test_exact_start_gives_exact_pairs_and_zero_staleness(moved: dict) -> None:
    h, exact = moved["h"], moved["exact"]
    w, s = np.linalg.eigh(h)
    sel = np.r_[0:ELL, len(w) - K_TOP:len(w)]
    start = WarmStart(tf.constant(s[:, sel].T), np.ones(K_TOP + ELL, bool), w[sel])
    program = _program(moved)
    check = program.check(start, seed=0)
    assert check.status == "ok" and check.staleness <= 1e-6
    np.testing.assert_allclose(check.ritz_values, exact, rtol=0, atol=1e-10)
    est = program.refine(check)
    np.testing.assert_allclose(est.eigenvalues.numpy(), exact, rtol=1e-6)
    assert est.residuals.max() <= 1e-8


def test_staleness_measures_the_distance_to_the_current_hessian(moved: dict) -> None:
    """The check's residuals are those of the Ritz pairs of span(V) (explicit), and its
    staleness is the larger of max residual (r₀ = 0 here) and eigenvalue drift over max|θ|."""
    start = _start(moved["first"])
    check = _program(moved).check(start, seed=0)
    drift = np.abs(check.ritz_values - start.eigenvalues).max()
    want = max(check.residuals.max(), drift) / np.abs(check.ritz_values).max()
    assert check.staleness == pytest.approx(want, rel=1e-12)
    v = start.rows_r.numpy().astype(np.float64)
    q, _ = np.linalg.qr(v.T)
    theta, y = np.linalg.eigh(q.T @ moved["h"] @ q)
    ritz = (q @ y).T
    residuals = np.linalg.norm(ritz @ moved["h"] - theta[:, None] * ritz, axis=1)
    order = np.r_[0:ELL, len(theta) - K_TOP:len(theta)]
    np.testing.assert_allclose(check.ritz_values, theta[order], rtol=1e-10)
    np.testing.assert_allclose(check.residuals, residuals[order], rtol=1e-4, atol=1e-7)
    assert check.staleness > 1e-3   # the weights moved


def test_invalid_rows_and_extra_directions_are_random_and_reproducible(moved: dict) -> None:
    start = _start(moved["first"])
    valid = start.valid.copy()
    valid[1] = False
    rows = tf.cast(start.rows_r, tf.float64)
    partial = WarmStart(tf.tensor_scatter_nd_update(rows, [[1]],
                                                    tf.zeros([1, moved["n"]], tf.float64)),
                        valid, start.eigenvalues)
    program = _program(moved, extra=2)
    assert program.hvps_per_refresh == 2 * (K_TOP + ELL + 2)
    a, b = program.estimate(partial, seed=5), program.estimate(partial, seed=5)
    assert a.num_valid == K_TOP + ELL and a.hvps == 2 * (K_TOP + ELL + 2)
    np.testing.assert_array_equal(a.eigenvalues.numpy(), b.eigenvalues.numpy())
    # The pairs whose vectors were kept stay within 1% of max|λ|; the lost one is searched for
    # from random directions only, so it is merely bounded by the spectrum (Courant–Fischer).
    values, exact = a.eigenvalues.numpy().astype(np.float64), moved["exact"]
    kept = [0, 2, 3, 4]
    assert np.abs(values[kept] - exact[kept]).max() <= 1e-2 * np.abs(exact).max()
    assert exact[0] - 1e-9 <= values[1] <= exact[1] + 1e-9


def test_non_finite_hvp_returns_no_pairs() -> None:
    n = 30
    a = np.diag(np.arange(1.0, n + 1))
    a[3, 3] = np.nan
    op = tf.constant(a)
    hvp = tf.function(lambda v: tf.linalg.matvec(op, v),
                      input_signature=[tf.TensorSpec([n], tf.float64)])
    program = BlockRitzProgram(hvp, n, 2, 0, LocalComm(), hvp_dtype=tf.float64)
    start = WarmStart(tf.constant(np.eye(n)[-2:]), np.ones(2, bool), np.array([29.0, 30.0]))
    est = program.estimate(start, seed=0)
    assert est.num_valid == 0 and est.status.startswith("non-finite")


def test_estimator_runs_lanczos_cold_and_the_block_program_warm(moved: dict) -> None:
    common = dict(hvp_dtype=tf.float64)
    estimator = CurvatureEstimator(
        SpectrumEstimator(moved["hvp"], moved["n"], K_TOP, ELL, LocalComm(), **common),
        _program(moved))
    cold = estimator.estimate(seed=0)
    assert not cold.warm and cold.hvps == 4 * (K_TOP + ELL) and estimator.last is not None
    warm = estimator.estimate(seed=1, start=estimator.last)
    assert warm.warm and warm.hvps == 2 * (K_TOP + ELL)
    none_valid = WarmStart(estimator.last.rows_r, np.zeros(K_TOP + ELL, bool),
                           estimator.last.eigenvalues)
    assert not estimator.estimate(seed=2, start=none_valid).warm


def test_orthonormalizer_drops_dependent_directions() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 50))
    x = np.vstack([x, x[0] + x[1]])          # rank 3
    c = orthonormalizer(x @ x.T, 1e-12)
    q = c @ x
    np.testing.assert_allclose(q[:3] @ q[:3].T, np.eye(3), atol=1e-10)
    np.testing.assert_array_equal(c[3], 0.0)
