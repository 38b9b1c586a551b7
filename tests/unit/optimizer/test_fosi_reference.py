"""DHO2 against an independent numpy implementation of the FOSI update (reference §3.2–3.4)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from dho2_tf import DHO2, LocalComm
from tests.unit.optimizer.quadratic import quadratic_model, random_spd

N, K_TOP, ELL = 12, 2, 1
STEPS, WARMUP, EVERY = 20, 5, 8          # refreshes before updates t = 4 and t = 12


def numpy_base(name, g, state, lr, t, beta=0.9, b1=0.9, b2=0.999, eps=1e-8):
    """Independent numpy base optimizers returning (displacement, state)."""
    if name == "sgd":
        return -lr * g, state
    if name == "momentum":
        buf = g + beta * state.get("buf", 0 * g)
        return -lr * buf, {"buf": buf}
    if name == "nesterov":
        buf = g + beta * state.get("buf", 0 * g)
        return -lr * (g + beta * buf), {"buf": buf}
    m = b1 * state.get("m", 0 * g) + (1 - b1) * g
    v = b2 * state.get("v", 0 * g) + (1 - b2) * g * g
    mh, vh = m / (1 - b1 ** t), v / (1 - b2 ** t)
    return -lr * mh / (np.sqrt(vh) + eps), {"m": m, "v": v}


NEWTON = {"sgd": (1.0, 0.0), "momentum": (1.0, 0.9), "nesterov": (1.9, 0.81),
          "adam": (0.1, 0.9)}


def fosi_numpy(a, b, theta, base, lr, alpha, c_max):
    """FOSI on f = ½θᵀAθ − bᵀθ with exact eigenpairs at each refresh; returns θ per step."""
    kk = K_TOP + ELL
    v, eta, c = np.zeros((kk, N)), np.zeros(kk), 1.0
    mom, state, out = np.zeros(N), {}, []
    a_g, a_m = NEWTON[base]
    for t in range(STEPS):
        if t + 1 >= WARMUP and (t + 1 - WARMUP) % EVERY == 0:
            w, u = np.linalg.eigh(a)
            sel = list(range(ELL)) + list(range(N - K_TOP, N))
            lam, v = w[sel], u[:, sel].T
            eta = np.abs(1.0 / lam)
            c = float(np.clip(eta[ELL] / eta[-1], 1.0, c_max))
        g = a @ theta - b
        g1 = v.T @ (v @ g)
        g2 = g - g1
        mom = a_g * g1 + a_m * mom
        d = v.T @ (eta * (v @ mom))
        u_step, state = numpy_base(base, g2, state, lr, t + 1)
        u_step = u_step - v.T @ (v @ u_step)
        theta = theta + c * u_step - alpha * d
        out.append(theta.copy())
    return np.array(out)


@pytest.mark.parametrize("base,lr", [("sgd", 0.1), ("momentum", 0.03), ("nesterov", 0.02),
                                     ("adam", 0.05)])
def test_fosi_update_matches_numpy_over_two_refreshes(base, lr):
    rng = np.random.default_rng(1)
    eig = np.array([0.3, 0.5, 0.7, 0.9, 1.1, 1.3, 1.5, 1.7, 1.9, 2.6, 4.0, 6.0])
    a = random_spd(N, eig, seed=2)
    b = rng.standard_normal(N)
    theta0 = rng.standard_normal(N)
    model, loss_fn, batch = quadratic_model(a, b, theta0)
    opt = DHO2(learning_rate=lr, base=base, k=K_TOP, ell=ELL, alpha=0.3, refresh_every=EVERY,
               warmup=WARMUP, comm=LocalComm())
    opt.bind(model, loss_fn, batch)
    got = []
    for _ in range(STEPS):
        opt.on_step_begin()
        with tf.GradientTape() as tape:
            loss = loss_fn(batch[1], model(batch[0]))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        got.append(model.trainable_variables[0].numpy().copy())
    want = fosi_numpy(a, b, theta0, base, lr, alpha=0.3, c_max=opt.c_max)
    assert int(opt._refreshes.numpy()) == 2
    scale = np.max(np.abs(want), axis=1, keepdims=True)
    np.testing.assert_array_less(np.max(np.abs(np.array(got) - want), axis=1), 1e-6 * scale[:, 0])
    # The run is not trivially the base optimizer: the refreshes changed the trajectory.
    assert np.max(np.abs(want[-1] - fosi_numpy_without_curvature(a, b, theta0, base, lr))) > 1e-3


def fosi_numpy_without_curvature(a, b, theta, base, lr):
    state = {}
    for t in range(STEPS):
        u_step, state = numpy_base(base, a @ theta - b, state, lr, t + 1)
        theta = theta + u_step
    return theta


def test_t5_zero_basis_equals_keras_sgd_bit_for_bit():
    """Before the first refresh (V = 0) DHO2-sgd is exactly Keras SGD."""
    rng = np.random.default_rng(3)
    a = random_spd(N, np.linspace(0.5, 3.0, N), seed=4)
    b, theta0 = rng.standard_normal(N), rng.standard_normal(N)
    results = []
    for opt in (DHO2(learning_rate=0.1, base="sgd", k=2, refresh_every=1000, comm=LocalComm()),
                tf.keras.optimizers.SGD(learning_rate=0.1)):
        model, loss_fn, batch = quadratic_model(a, b, theta0)
        for _ in range(5):
            with tf.GradientTape() as tape:
                loss = loss_fn(batch[1], model(batch[0]))
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables))
        results.append(model.trainable_variables[0].numpy())
    np.testing.assert_array_equal(results[0], results[1])
