"""Run under horovodrun: reliability of DHO2 across ranks.

Usage:
  reliability_check.py mismatch             rank widths differ -> clear error on every rank
  reliability_check.py poisoned             rank 1 sees a NaN batch -> same step skipped everywhere
  reliability_check.py write DIR            np=2: 30 steps, state exported at step 15 into DIR
  reliability_check.py resume DIR           any np: import step-15 state, 15 steps, compare
"""

from __future__ import annotations

import os
import pickle
import sys

import numpy as np
import tensorflow as tf

from dho2_tf import DHO2, CurvatureRefresh, HorovodComm

D, C, GLOBAL = 10, 4, 12
LOSS = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def mlp(hidden=24):
    tf.keras.utils.set_random_seed(0)
    return tf.keras.Sequential([tf.keras.Input((D,)),
                                tf.keras.layers.Dense(hidden, activation="tanh"),
                                tf.keras.layers.Dense(C)])


def data(rows, seed=5):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, D)).astype("float32"),
            rng.integers(0, C, rows).astype("int32"))


def check_mismatch(comm):
    model = mlp(hidden=24 if comm.rank == 0 else 32)
    model.compile(optimizer=DHO2(k=2, comm=comm), loss=LOSS)
    x, y = data(64)
    try:
        model.fit(x, y, batch_size=16, verbose=0, callbacks=[CurvatureRefresh(batch=(x, y))])
    except ValueError as err:
        print(f"rank {comm.rank} MISMATCH_ERROR {str(err).splitlines()[0]}", flush=True)
        return
    raise AssertionError("no error although the ranks built different models")


def check_poisoned(comm):
    x, y = data(comm.size * 8 * 16)
    x_r, y_r = x[comm.rank::comm.size].copy(), y[comm.rank::comm.size]
    if comm.rank == 1:
        x_r[3 * 16:4 * 16] = np.nan                  # only rank 1's 4th batch is poisoned
    model = mlp()
    opt = DHO2(learning_rate=0.05, base="momentum", k=2, refresh_every=3, warmup=2, comm=comm)
    model.compile(optimizer=opt, loss=LOSS)
    model.fit(x_r, y_r, batch_size=16, shuffle=False, verbose=0,
              callbacks=[CurvatureRefresh(batch=(x_r[:16], y_r[:16]) if comm.rank == 0
                                          else (x_r[16:32], y_r[16:32]))])
    w = np.concatenate([v.numpy().ravel() for v in model.trainable_variables])
    assert np.all(np.isfinite(w)) and np.all(np.isfinite(opt._eigenvalues.numpy()))
    assert opt.curvature_metrics()["skipped_steps"] == 1.0
    every = comm.allgather(tf.constant(w[None, :]), name="test/poisoned").numpy()
    assert np.all(every == every[0]), "ranks diverged after the skipped step"
    print(f"rank {comm.rank} POISONED_OK skipped=1", flush=True)


def run_steps(comm, model, opt, x, y, steps, start):
    """Custom loop on this rank's slice of each global batch; returns global mean losses."""
    r, b = comm.rank, GLOBAL // comm.size
    losses = []
    for t in range(start, start + steps):
        rows = slice(t * GLOBAL + r * b, t * GLOBAL + (r + 1) * b)
        opt.on_step_begin()
        with tf.GradientTape() as tape:
            loss = LOSS(y[rows], model(x[rows], training=True))
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                model.trainable_variables))
        opt.on_step_end()
        losses.append(float(comm.allreduce(tf.reshape(loss, [1]), "mean",
                                           name="test/loss").numpy()[0]))
    return losses


def setup(comm):
    x, y = data(30 * GLOBAL)
    xc, yc = data(GLOBAL, seed=9)
    b = GLOBAL // comm.size
    model = mlp()
    opt = DHO2(learning_rate=0.05, base="adam", k=3, ell=1, refresh_every=6, warmup=4,
               comm=comm)
    opt.bind(model, LOSS, (xc[comm.rank * b:(comm.rank + 1) * b],
                           yc[comm.rank * b:(comm.rank + 1) * b]))
    return model, opt, x, y


def check_write(comm, folder):
    model, opt, x, y = setup(comm)
    losses = run_steps(comm, model, opt, x, y, 15, 0)
    state = {"optimizer": opt.export_state(), "weights": model.get_weights()}
    losses += run_steps(comm, model, opt, x, y, 15, 15)
    if comm.rank == 0:
        tmp = os.path.join(folder, "state.pkl.tmp")
        with open(tmp, "wb") as f:
            pickle.dump({"state": state, "losses": losses}, f)
        os.replace(tmp, os.path.join(folder, "state.pkl"))
    comm.barrier()
    print(f"rank {comm.rank} WRITE_OK P={comm.size}", flush=True)


def check_resume(comm, folder):
    with open(os.path.join(folder, "state.pkl"), "rb") as f:
        saved = pickle.load(f)
    model, opt, x, y = setup(comm)
    model.set_weights(saved["state"]["weights"])
    opt.import_state(saved["state"]["optimizer"])
    assert int(opt.iterations.numpy()) == 15
    losses = run_steps(comm, model, opt, x, y, 15, 15)
    want = np.array(saved["losses"][15:])
    np.testing.assert_allclose(losses, want, rtol=1e-5)
    print(f"rank {comm.rank} RESUME_OK P={comm.size} last_loss={losses[-1]:.6f}", flush=True)


def main() -> None:
    comm = HorovodComm()
    what = sys.argv[1]
    if what == "mismatch":
        check_mismatch(comm)
    elif what == "poisoned":
        check_poisoned(comm)
    elif what == "write":
        check_write(comm, sys.argv[2])
    else:
        check_resume(comm, sys.argv[2])


if __name__ == "__main__":
    main()
