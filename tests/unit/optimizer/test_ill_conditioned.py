"""DHO2 vs plain SGD on an ill-conditioned quadratic (n = 100, condition number 1e4)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from dho2_tf import DHO2, LocalComm
from tests.unit.optimizer.quadratic import quadratic_model, random_spd

N = 100
TARGET = 1e-6


def spectrum() -> np.ndarray:
    """λ_max = 1, λ_min = 1e-4: 10 large outliers, a bulk in [0.02, 0.1], 5 tiny eigenvalues."""
    top = np.geomspace(0.2, 1.0, 10)
    bulk = np.linspace(0.02, 0.1, 85)
    bottom = np.geomspace(1e-4, 1e-3, 5)
    return np.sort(np.concatenate([bottom, bulk, top]))


def sgd_steps_to_target(eig: np.ndarray, c0: np.ndarray, lr: float, limit: int) -> int:
    """Exact SGD step count on f = ½Σλ_i c_i² (closed form per eigen-direction)."""
    t = np.arange(limit + 1)[:, None]
    loss = 0.5 * np.sum(eig * c0 ** 2 * (1 - lr * eig) ** (2 * t), axis=1)
    hit = np.nonzero(loss < TARGET)[0]
    return int(hit[0]) if hit.size else limit + 1


def test_dho2_sgd_needs_at_most_a_fifth_of_sgd_steps():
    eig = spectrum()
    assert np.isclose(eig.max() / eig.min(), 1e4)
    a = random_spd(N, eig, seed=0)
    theta0 = np.random.default_rng(1).standard_normal(N)
    _, u = np.linalg.eigh(a)
    c0 = u.T @ theta0
    # Plain SGD at its largest stable learning rates (lr < 2/λ_max); best of the grid.
    sgd_steps = min(sgd_steps_to_target(eig, c0, lr, 200_000) for lr in (1.0, 1.5, 1.9, 1.99))
    assert sgd_steps < 200_000

    model, loss_fn, batch = quadratic_model(a, np.zeros(N), theta0)
    opt = DHO2(learning_rate=0.6, base="sgd", k=10, ell=5, alpha=1.0, refresh_every=100,
               warmup=1, comm=LocalComm())
    opt.bind(model, loss_fn, batch)

    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            loss = loss_fn(batch[1], model(batch[0]))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    budget = sgd_steps // 5
    dho2_steps = None
    for step in range(budget + 1):
        loss = float(loss_fn(batch[1], model(batch[0])))
        if loss < TARGET:
            dho2_steps = step
            break
        opt.on_step_begin()
        train_step()
    assert dho2_steps is not None, f"DHO2 did not reach {TARGET} within {budget} steps " \
                                   f"(SGD needs {sgd_steps}); last loss {loss:.3g}"
    # Curvature was really used: the estimated extremes match the true ones.
    lam = opt.state.eigenvalues.numpy()
    np.testing.assert_allclose(np.sort(lam), np.sort(np.r_[eig[:5], eig[-10:]]), rtol=1e-6)
