"""Run under horovodrun: DHO2 on P ranks equals single-process DHO2 on the union of batches.

Usage: dho2_data_parallel_check.py BASE [MODE] (MODE: sharded (default), replicated or auto).
Every rank trains through ``model.fit`` on its slice of each global batch; then, in the same
process, a single-process DHO2 (LocalComm) trains on the whole global batches. Checks (rel 1e-5):
weights, eigenvalues and the eigenvector projector VᵀV equal the single-process run, and every
rank holds bitwise identical weights and eigenvalues.
"""

from __future__ import annotations

import sys

import numpy as np
import tensorflow as tf

from dho2_tf import DHO2, CurvatureRefresh, HorovodComm, LocalComm
from dho2_tf.curvature.spectrum import gather_vectors

B, STEPS, D, C = 16, 10, 10, 4
LOSS = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def build(comm, seed=0):
    tf.keras.utils.set_random_seed(seed)
    model = tf.keras.Sequential([tf.keras.Input((D,)), tf.keras.layers.Dense(24, activation="tanh"),
                                 tf.keras.layers.Dense(C)])
    opt = DHO2(learning_rate=0.05, base=sys.argv[1] if len(sys.argv) > 1 else "adam", k=3,
               ell=1, alpha=0.2, refresh_every=4, warmup=3,
               mode=sys.argv[2] if len(sys.argv) > 2 else "sharded", comm=comm)
    model.compile(optimizer=opt, loss=LOSS)
    return model, opt


def main() -> None:
    comm = HorovodComm()
    p, r = comm.size, comm.rank
    rng = np.random.default_rng(123)
    x = rng.standard_normal((STEPS * p * B, D)).astype("float32")
    y = rng.integers(0, C, STEPS * p * B).astype("int32")
    x_ese, y_ese = x[: p * B], y[: p * B]
    # Rank r's data: its slice of every global batch, in order.
    mine = np.concatenate([np.arange(s * p * B + r * B, s * p * B + (r + 1) * B)
                           for s in range(STEPS)])

    model, opt = build(comm)
    model.fit(x[mine], y[mine], batch_size=B, epochs=1, shuffle=False, verbose=0,
              callbacks=[CurvatureRefresh(batch=(x_ese[r * B:(r + 1) * B],
                                                 y_ese[r * B:(r + 1) * B]))])
    ref, ref_opt = build(LocalComm())
    ref.fit(x, y, batch_size=p * B, epochs=1, shuffle=False, verbose=0,
            callbacks=[CurvatureRefresh(batch=(x_ese, y_ese))])

    assert int(opt.state.refreshes.numpy()) == 2 == int(ref_opt.state.refreshes.numpy())  # t = 2, 6
    w = np.concatenate([v.numpy().ravel() for v in model.trainable_variables])
    w_ref = np.concatenate([v.numpy().ravel() for v in ref.trainable_variables])
    rel = np.max(np.abs(w - w_ref)) / np.max(np.abs(w_ref))
    assert rel < 1e-5, f"weights differ from single process: rel {rel:.3g}"
    lam, lam_ref = opt.state.eigenvalues.numpy(), ref_opt.state.eigenvalues.numpy()
    np.testing.assert_allclose(lam, lam_ref, rtol=1e-5)
    v = opt.state.eigenvectors.numpy() if opt.resolved_mode == "replicated" else \
        gather_vectors(opt.state.eigenvectors, w.size, comm).numpy()
    v_ref = ref_opt.state.eigenvectors.numpy()
    np.testing.assert_allclose(v.T @ v, v_ref.T @ v_ref, atol=1e-5)
    every = comm.allgather(tf.constant(np.r_[w, lam][None, :]), name="test/compare").numpy()
    assert np.all(every == every[0]), "ranks hold different weights or eigenvalues"
    comm.barrier()
    if r == 0:
        print(f"DHO2_DATA_PARALLEL_OK P={p} mode={opt.resolved_mode} rel={rel:.2e} "
              f"eigenvalues={lam}")


if __name__ == "__main__":
    main()
