"""Run under horovodrun: reliability of DHO2 across ranks.

Usage:
  reliability_check.py mismatch             rank widths differ -> clear error on every rank;
                                            then fit with another batch size on rank 1 -> the
                                            same (FIT_BATCH_ERROR)
  reliability_check.py poisoned             rank 1 sees a NaN batch -> same step skipped everywhere
                                            (sharded and replicated layouts); then a wrong c
                                            after a refresh -> the same guard trips everywhere
  reliability_check.py straight DIR         30 steps per mode (sharded, replicated, admm);
                                            reference in DIR
  reliability_check.py first DIR            15 steps per mode, then a checkpoint in DIR
  reliability_check.py resume DIR MODES     new process: restore, 15 steps, compare with straight

Several stages run in order in one launch: ``reliability_check.py mismatch first DIR``.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import tensorflow as tf

import dho2_tf.optimizer_state as optimizer_module
from dho2_tf import DHO2, CurvatureRefresh, HorovodComm
from dho2_tf.training.checkpointing import restore_checkpoint, save_checkpoint

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
    start = time.monotonic()
    model = mlp(hidden=24 if comm.rank == 0 else 32)
    model.compile(optimizer=DHO2(k=2, comm=comm), loss=LOSS)
    x, y = data(64)
    try:
        model.fit(x, y, batch_size=16, verbose=0, callbacks=[CurvatureRefresh(batch=(x, y))])
    except ValueError as err:
        print(f"rank {comm.rank} MISMATCH_SECONDS {time.monotonic() - start:.1f}", flush=True)
        print(f"rank {comm.rank} MISMATCH_ERROR {err}", flush=True)
        return
    raise AssertionError("no error although the ranks built different models")


def check_fit_batch(comm):
    """``fit`` with batch 16 on rank 0 and 32 on rank 1 (4 and 2 steps): error on every rank."""
    start = time.monotonic()
    model = mlp()
    model.compile(optimizer=DHO2(k=2, comm=comm), loss=LOSS)
    x, y = data(64)
    try:
        model.fit(x, y, batch_size=16 if comm.rank == 0 else 32, verbose=0,
                  callbacks=[CurvatureRefresh(batch=(x, y))])
    except ValueError as err:
        print(f"rank {comm.rank} FIT_BATCH_SECONDS {time.monotonic() - start:.1f}", flush=True)
        print(f"rank {comm.rank} FIT_BATCH_ERROR {err}", flush=True)
        return
    raise AssertionError("no error although the ranks fit with different batch sizes")


def check_poisoned(comm):
    x, y = data(comm.size * 8 * 16)
    x_r, y_r = x[comm.rank::comm.size].copy(), y[comm.rank::comm.size]
    if comm.rank == 1:
        x_r[3 * 16:4 * 16] = np.nan                  # only rank 1's 4th batch is poisoned
    # Adam with its fused in-place kernel: it must run on no rank at the poisoned step.
    optimizer_module.IN_PLACE_MIN_SIZE = 1
    for mode, base in (("sharded", "momentum"), ("replicated", "momentum"), ("sharded", "adam")):
        model = mlp()
        opt = DHO2(learning_rate=0.05, base=base, k=2, refresh_every=3, warmup=2, mode=mode,
                   comm=comm)
        model.compile(optimizer=opt, loss=LOSS)
        model.fit(x_r, y_r, batch_size=16, shuffle=False, verbose=0,
                  callbacks=[CurvatureRefresh(batch=(x_r[:16], y_r[:16]) if comm.rank == 0
                                              else (x_r[16:32], y_r[16:32]))])
        w = np.concatenate([v.numpy().ravel() for v in model.trainable_variables])
        assert np.all(np.isfinite(w)) and np.all(np.isfinite(opt.state.eigenvalues.numpy()))
        assert all(np.all(np.isfinite(v.numpy())) for v in opt.variables)
        assert opt.curvature_metrics()["skipped_steps"] == 1.0
        assert opt.state.in_place     # linear bases always, Adam above the (lowered) size
        every = comm.allgather(tf.constant(w[None, :]), name="test/poisoned").numpy()
        assert np.all(every == every[0]), "ranks diverged after the skipped step"
        print(f"rank {comm.rank} POISONED_OK mode={mode} base={base} skipped=1", flush=True)


def check_guard(comm):
    """A wrong c (40) installed right after the refresh makes a least-squares fit diverge; the
    guard, fed by the reduced ‖Ḡ‖², trips at the same steps on every rank (each rank has its
    own data), the ranks' weights stay identical and the run converges."""
    rng = np.random.default_rng(11 + comm.rank)
    x = rng.standard_normal((40 * 16, D)).astype("float32")
    y = (x @ np.linspace(-1.0, 1.0, D) + 0.01 * rng.standard_normal(len(x))).astype("float32")
    for mode in ("sharded", "replicated"):
        tf.keras.utils.set_random_seed(0)
        model = tf.keras.Sequential([tf.keras.Input((D,)), tf.keras.layers.Dense(1)])
        opt = DHO2(learning_rate=0.05, base="sgd", k=2, refresh_every=1000, warmup=4, mode=mode,
                   comm=comm)
        model.compile(optimizer=opt, loss="mse")

        def wrong_scale(info):
            opt.state.scale.assign(40.0)

        start = model.evaluate(x, y, verbose=0)
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[
            CurvatureRefresh(batch=(x[:64], y[:64]), on_refresh=wrong_scale)])
        end = model.evaluate(x, y, verbose=0)
        metrics = opt.curvature_metrics()
        w = np.concatenate([v.numpy().ravel() for v in model.trainable_variables])
        mine = np.concatenate([w, [metrics["guard_trips"], metrics["guard_level"]]])
        every = comm.allgather(tf.constant(mine[None, :]), name=f"test/guard/{mode}").numpy()
        assert np.all(every == every[0]), f"ranks took different guard decisions: {every}"
        assert metrics["guard_trips"] >= 1 and metrics["skipped_steps"] == 0.0, metrics
        assert end < 0.25 * start, (start, end)        # it diverged, then trained on
        print(f"rank {comm.rank} GUARD_OK mode={mode} trips={int(metrics['guard_trips'])}",
              flush=True)


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


MODES = ("sharded", "replicated", "admm")


def setup(comm, mode):
    x, y = data(30 * GLOBAL)
    xc, yc = data(GLOBAL, seed=9)
    b = GLOBAL // comm.size
    model = mlp()
    options = {"rho": 0.5, "tau": 4} if mode == "admm" else {}  # step 15: mid-round
    opt = DHO2(learning_rate=0.05, base="adam", k=3, ell=1, refresh_every=6, warmup=4,
               mode=mode, comm=comm, **options)
    model.compile(optimizer=opt, loss=LOSS)
    opt.bind(model, LOSS, (xc[comm.rank * b:(comm.rank + 1) * b],
                           yc[comm.rank * b:(comm.rank + 1) * b]))
    return model, opt, x, y


def final_state(model, opt):
    """This rank's weights and optimizer state (eigenvectors etc. at full length)."""
    state = {f"opt/{k}": np.asarray(v) for k, v in opt.export_state().items()
             if not k.startswith("__")}
    state.update({f"model/{i}": v.numpy() for i, v in enumerate(model.variables)})
    return state


def check_straight(comm, folder):
    """30 steps in one go: the reference of every mode (one file per rank)."""
    for mode in MODES:
        model, opt, x, y = setup(comm, mode)
        losses = run_steps(comm, model, opt, x, y, 30, 0)
        np.savez(os.path.join(folder, f"straight-{mode}-rank{comm.rank}.npz"),
                 losses=np.array(losses), **final_state(model, opt))
    print(f"rank {comm.rank} STRAIGHT_OK P={comm.size}", flush=True)


def check_first(comm, folder):
    """15 steps, then a checkpoint; the process ends."""
    for mode in MODES:
        model, opt, x, y = setup(comm, mode)
        run_steps(comm, model, opt, x, y, 15, 0)
        save_checkpoint(os.path.join(folder, f"ckpt-{mode}"), model, opt, comm, epoch=1)
    print(f"rank {comm.rank} FIRST_OK P={comm.size}", flush=True)


def check_resume(comm, folder, modes):
    """A new process restores the checkpoint and takes steps 15..29; compares with straight."""
    for mode in modes:
        model, opt, x, y = setup(comm, mode)
        info = restore_checkpoint(os.path.join(folder, f"ckpt-{mode}"), model, opt, comm)
        assert info.step == 15 == int(opt.iterations.numpy()), info
        losses = run_steps(comm, model, opt, x, y, 15, 15)
        same_world = info.ranks == comm.size
        with np.load(os.path.join(folder, f"straight-{mode}-rank"
                                  f"{comm.rank if same_world else 0}.npz")) as ref:
            np.testing.assert_allclose(losses, ref["losses"][15:], rtol=1e-5)
            if same_world:  # the whole state, eigenpairs included, to 1e-6
                got = final_state(model, opt)
                assert sorted(got) == sorted(k for k in ref.files if k != "losses")
                for key, value in got.items():
                    np.testing.assert_allclose(value, ref[key], rtol=1e-6, atol=1e-6,
                                               err_msg=f"{mode} {key}")
        print(f"rank {comm.rank} RESUME_OK mode={mode} P={comm.size} from={info.ranks} "
              f"last_loss={losses[-1]:.6f}", flush=True)


def main() -> None:
    comm = HorovodComm()
    args = sys.argv[1:]
    while args:                       # the stages in order, in this one process
        what = args.pop(0)
        if what == "mismatch":
            check_mismatch(comm)
            check_fit_batch(comm)
        elif what == "poisoned":
            check_poisoned(comm)
            check_guard(comm)
        elif what == "straight":
            check_straight(comm, args.pop(0))
        elif what == "first":
            check_first(comm, args.pop(0))
        elif what == "resume":
            folder, modes = args.pop(0), args.pop(0)
            check_resume(comm, folder, modes.split(","))
        else:
            raise SystemExit(f"unknown stage {what!r}")


if __name__ == "__main__":
    main()
