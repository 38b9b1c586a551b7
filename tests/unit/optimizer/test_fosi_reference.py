"""DHO2 against an independent numpy implementation of the FOSI update (the class docstring's
``Math:``; Sivan et al., ICLR 2024, §3), in every layout that runs it in one process."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from dho2_tf import DHO2, LocalComm
from tests.unit.optimizer.quadratic import quadratic_model, random_spd
from tests.unit.optimizer.test_keras_integration import LOSS, toy_data

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


@pytest.mark.parametrize("mode", ["sharded", "replicated"])
@pytest.mark.parametrize("base,lr", [("sgd", 0.1), ("momentum", 0.03), ("nesterov", 0.02),
                                     ("adam", 0.05)])
def test_fosi_update_matches_numpy_over_two_refreshes(base, lr, mode):
    rng = np.random.default_rng(1)
    eig = np.array([0.3, 0.5, 0.7, 0.9, 1.1, 1.3, 1.5, 1.7, 1.9, 2.6, 4.0, 6.0])
    a = random_spd(N, eig, seed=2)
    b = rng.standard_normal(N)
    theta0 = rng.standard_normal(N)
    model, loss_fn, batch = quadratic_model(a, b, theta0)
    opt = DHO2(learning_rate=lr, base=base, k=K_TOP, ell=ELL, alpha=0.3, refresh_every=EVERY,
               warmup=WARMUP, mode=mode, comm=LocalComm())
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
    assert int(opt.state.refreshes.numpy()) == 2
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


def float64_mlp(seed=0):
    tf.keras.utils.set_random_seed(seed)
    return tf.keras.Sequential([tf.keras.Input((8,), dtype="float64"),
                                tf.keras.layers.Dense(16, activation="tanh", dtype="float64"),
                                tf.keras.layers.Dense(3, dtype="float64")])


def numpy_fosi_step(g, theta, state, curv, base, lr, alpha, t):
    """One step of the class docstring's equations, with plain vectors (m, base slots)."""
    v, eta, c = curv
    a_g, a_m = NEWTON[base]
    g1 = v.T @ (v @ g)
    g2 = g - g1
    newton = state["newton"] = a_g * g1 + a_m * state.get("newton", 0 * g)
    d = v.T @ (eta * (v @ newton))
    u, base_state = numpy_base(base, g2, state.get("base", {}), lr, t)
    state["base"] = base_state
    u = u - v.T @ (v @ u)
    return theta + c * u - alpha * d


@pytest.mark.parametrize("mode", ["sharded", "replicated"])
@pytest.mark.parametrize("base,lr", [("sgd", 0.2), ("momentum", 0.05), ("nesterov", 0.05),
                                     ("adam", 0.02)])
def test_lean_step_matches_numpy_when_the_curvature_changes(base, lr, mode, monkeypatch):
    """A non-quadratic loss: V, η and c change at every refresh, so the momentum and the
    heavy-ball buffer kept in the basis of V must be re-based correctly. Each numpy step uses
    the gradient DHO2 saw at that step, so errors cannot compound; Adam runs its in-place
    kernel (the size threshold is lowered) and the out-of-place formula alike."""
    import dho2_tf.optimizer_state as optimizer_module

    monkeypatch.setattr(optimizer_module, "IN_PLACE_MIN_SIZE", 1 if mode == "sharded" else 1 << 30)
    x, y = toy_data()
    x = x.astype("float64")
    model = float64_mlp()
    opt = DHO2(learning_rate=lr, base=base, k=3, ell=1, alpha=0.4, refresh_every=4, warmup=2,
               mode=mode, comm=LocalComm())
    opt.bind(model, LOSS, (x[:64], y[:64]))
    variables = model.trainable_variables

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = LOSS(yb, model(xb, training=True))
        grads = tape.gradient(loss, variables)
        opt.apply_gradients(zip(grads, variables))
        return tf.concat([tf.reshape(g, [-1]) for g in grads], 0)

    flat = lambda: np.concatenate([v.numpy().ravel() for v in variables])  # noqa: E731
    kk = opt.num_pairs
    curv = (np.zeros((kk, opt.spec.n)), np.zeros(kk), 1.0)
    theta_ref, state, seen = flat(), {}, []
    for t in range(14):
        before = opt.refresh_index()
        opt.on_step_begin()
        if opt.refresh_index() > before:
            curv = (opt.state.eigenvectors.numpy(), opt.state.rates.numpy(), float(opt.state.scale.numpy()))
            seen.append(curv[1])
        theta = flat()
        # Γ of the estimate equals V Vᵀ to ~1e-8, hence the tolerance.
        np.testing.assert_allclose(theta, theta_ref, rtol=0, atol=1e-7 * np.max(np.abs(theta)))
        g = step(x[t * 16:(t + 1) * 16], y[t * 16:(t + 1) * 16]).numpy()
        theta_ref = numpy_fosi_step(g, theta, state, curv, base, lr, 0.4, t + 1)
    np.testing.assert_allclose(flat(), theta_ref, rtol=0, atol=1e-7 * np.max(np.abs(theta_ref)))
    assert len(seen) == 4 and not np.allclose(seen[0], seen[1])   # t = 1, 5, 9, 13: V changed
    assert opt.state.in_place == (base != "adam" or mode == "sharded")
