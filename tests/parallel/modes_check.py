"""Run under horovodrun: DHO2's distribution modes against single-process references.

Usage: ``modes_check.py [--curvature-ranks P_C] CHECK [CHECK ...]`` with CHECK one of
comm (HorovodComm's collectives against numpy), sharded (P ranks against one process, every
base), replicated, auto, memory, faithful, admm, pipelined, misconfig, contract (the Keras
optimizer contract of the pipelined mode, P = 3 with one curvature rank only), or ``all`` (every
check but contract, in that order). ``pipelined`` (and
``comm``, on the pipelined process sets) uses P_C curvature ranks (default max(1, P // 2)),
which must leave at least one update rank. The checks run one after another in the same
processes (one Horovod start-up for all of them). Rank 0 prints ``MODES_CHECK_OK <check> P=<P>
...`` once every rank passed that check; a rank whose check raises prints
``MODES_CHECK_FAIL <check> P=<P> rank=<r>`` with the traceback and exits non-zero (horovodrun
then ends the other ranks).
"""

from __future__ import annotations

import argparse
import os
import time
import traceback

import numpy as np
import tensorflow as tf

import dho2_tf.optimizer_state as optimizer_module
from dho2_tf import DHO2, CurvatureRefresh, HorovodComm, LocalComm
from dho2_tf.curvature.hvp import make_hvp_fn
from dho2_tf.curvature.spectrum import estimate_spectrum, gather_vectors
from dho2_tf.distributed.comm import CountingComm
from dho2_tf.distributed.pipeline import PipelineGroups, pipeline_process_sets
from dho2_tf.distributed.sharding import ShardLayout

D, C, B = 10, 4, 16
LOSS = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def mlp(seed=0, hidden=(24,)):
    tf.keras.utils.set_random_seed(seed)
    layers = [tf.keras.Input((D,))] + [tf.keras.layers.Dense(h, activation="tanh")
                                       for h in hidden] + [tf.keras.layers.Dense(C)]
    return tf.keras.Sequential(layers)


def data(rows, seed=123):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, D)).astype("float32"),
            rng.integers(0, C, rows).astype("int32"))


def flat(model):
    return np.concatenate([v.numpy().ravel() for v in model.trainable_variables])


def same_on_all_ranks(comm, array, what):
    every = comm.allgather(tf.constant(np.asarray(array, np.float32).ravel()[None, :]),
                           name=f"test/same/{what}").numpy()
    assert np.all(every == every[0]), f"ranks differ in {what}"


def check_comm(comm, curvature_ranks):
    """HorovodComm's collectives against numpy at this world size, on all ranks and on the
    pipelined mode's process sets (n = 11: not divisible by P = 2, 3 or 4, so shards pad)."""
    p, r = comm.size, comm.rank
    n = 11
    rng = np.random.default_rng(42)                   # the same numbers on every rank
    xs = rng.standard_normal((p, n))
    total = xs.sum(0)

    def close(got, want, what):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12,
                                   err_msg=f"rank {r}: {what}")

    mine = tf.constant(xs[r])
    close(comm.allreduce(mine, "sum", name="test/comm/sum"), total, "allreduce sum")
    close(comm.allreduce(mine, "mean", name="test/comm/mean"), total / p, "allreduce mean")
    a, b = comm.grouped_allreduce([mine, tf.constant(xs[r, :3] * (r + 1))], "sum",
                                  name="test/comm/grouped")
    close(a, total, "grouped allreduce [0]")
    close(b, sum(xs[j, :3] * (j + 1) for j in range(p)), "grouped allreduce [1]")
    layout = ShardLayout(n, p, r)
    for op, want in (("sum", total), ("mean", total / p)):
        block = comm.reducescatter(layout.pad(mine), op, name=f"test/comm/rs_{op}")
        close(block, layout.local(tf.constant(want)), f"reducescatter {op}")
        whole = layout.unpad(comm.allgather(block, name=f"test/comm/ag_{op}"))
        close(whole, want, f"allgather of the reduce-scattered blocks ({op})")
    rows = tf.constant(np.full((r + 1, 2), float(r)))          # rank r sends r + 1 rows
    close(comm.allgather(rows, name="test/comm/ag_rows"),
          np.concatenate([np.full((j + 1, 2), float(j)) for j in range(p)]), "allgather rows")
    close(comm.broadcast(mine, p - 1, name="test/comm/bcast"), xs[p - 1], "broadcast")
    # alltoall: rank s sends j + 1 rows valued 100 s + j to member j.
    sent = np.concatenate([np.full((j + 1, 2), 100.0 * r + j) for j in range(p)])
    got = comm.alltoall(tf.constant(sent), [j + 1 for j in range(p)], name="test/comm/a2a")
    close(got, np.concatenate([np.full((r + 1, 2), 100.0 * s + r) for s in range(p)]),
          "alltoall")
    assert comm.broadcast_object({"root": r}, 1, name="test/comm/bo") == {"root": 1}
    assert comm.allgather_object(("rank", r), name="test/comm/go") == [("rank", j)
                                                                       for j in range(p)]
    # Collectives restricted to each process set of the pipelined mode.
    groups = PipelineGroups.of(p, curvature_ranks)
    for ranks in groups.process_sets():
        group = comm.group(ranks)
        assert comm.group_size(group) == len(ranks)
        if not group.includes(r):
            continue
        sub = xs[list(ranks)]
        close(comm.allreduce(mine, "sum", name=f"test/comm/set{ranks}", process_set=group),
              sub.sum(0), f"allreduce over {ranks}")
        g_layout = ShardLayout(n, len(ranks), comm.group_rank(group))
        block = comm.reducescatter(g_layout.pad(mine), "sum", name=f"test/comm/set_rs{ranks}",
                                   process_set=group)
        close(block, g_layout.local(tf.constant(sub.sum(0))), f"reducescatter over {ranks}")
        close(comm.allgather(mine[None, :], name=f"test/comm/set_ag{ranks}", process_set=group),
              sub, f"allgather over {ranks}")
    return f"comm P={p} sets={groups.process_sets()}"


#: (base, mode, extra DHO2 arguments) of the data-parallel check: every base on the sharded
#: layout, and ``auto``, which resolves to the replicated layout for this small state.
DATA_PARALLEL_RUNS = (("nesterov", "sharded", {}), ("adam", "sharded", {"alpha": 0.2}),
                      ("momentum", "sharded", {"alpha": 0.2}), ("adam", "auto", {"alpha": 0.2}))


def fit_union_protocol(xs, ys, bs, ese, base, mode, extra, rank_comm):
    """DHO2 (base, mode) on ``xs`` in batches of ``bs`` with the 10-step protocol of
    :func:`check_sharded`: (weights, last update, refresh index, eigenvalues, optimizer)."""
    model = mlp()
    model.compile(optimizer=DHO2(learning_rate=0.05, base=base, k=3, ell=1, refresh_every=4,
                                 warmup=3, mode=mode, comm=rank_comm, **extra), loss=LOSS)
    cut = len(xs) - bs
    model.fit(xs[:cut], ys[:cut], batch_size=bs, shuffle=False, verbose=0,
              callbacks=[CurvatureRefresh(batch=ese)])
    w9 = flat(model)
    model.fit(xs[cut:], ys[cut:], batch_size=bs, shuffle=False, verbose=0,
              callbacks=[CurvatureRefresh(batch=ese)])
    opt = model.optimizer
    return (flat(model), flat(model) - w9, int(opt.refresh_index()),
            opt.state.eigenvalues.numpy(), opt)


def check_sharded(comm):
    """P ranks equal single-process DHO2 on the union of their batches: weights, eigenvalues,
    the eigenvector projector VᵀV and the last update after 10 steps (rel 1e-5), for every base
    on the sharded layout and for ``auto`` (replicated here); every rank holds the same weights
    and eigenvalues.

    The single-process reference of run j is the same on every rank, so rank j mod P alone
    computes it and broadcasts it (the references run side by side instead of P times each)."""
    p, r = comm.size, comm.rank
    steps = 10
    x, y = data(steps * p * B)
    mine = np.concatenate([np.arange(s * p * B + r * B, s * p * B + (r + 1) * B)
                           for s in range(steps)])
    runs = [fit_union_protocol(x[mine], y[mine], B, (x[r * B:(r + 1) * B], y[r * B:(r + 1) * B]),
                               base, mode, extra, comm)
            for base, mode, extra in DATA_PARALLEL_RUNS]
    references = {}
    for j, (base, mode, extra) in enumerate(DATA_PARALLEL_RUNS):
        if j % p == r:
            w, dw, index, lam, opt = fit_union_protocol(x, y, p * B, (x[:p * B], y[:p * B]),
                                                        base, mode, extra, LocalComm())
            references[j] = (w, dw, index, lam, opt.state.eigenvectors.numpy())
    layouts = []
    for j, (base, mode, _) in enumerate(DATA_PARALLEL_RUNS):
        w_ref, dw_ref, ref_index, lam_ref, v_ref = comm.broadcast_object(
            references.get(j), j % p, name=f"test/sharded/reference{j}")
        w, dw, index, lam, opt = runs[j]
        what = f"{base}/{mode}"
        assert index == 2 == ref_index, what  # t = 2, 6
        for got, want, name in ((w, w_ref, "weights"), (dw, dw_ref, "last update")):
            rel = np.max(np.abs(got - want)) / np.max(np.abs(want))
            assert rel < 1e-5, f"{what}: {name} differ from single process: rel {rel:.3g}"
        np.testing.assert_allclose(lam, lam_ref, rtol=1e-5, err_msg=what)
        v = opt.state.eigenvectors.numpy() if opt.resolved_mode == "replicated" else \
            gather_vectors(opt.state.eigenvectors, w.size, comm).numpy()
        np.testing.assert_allclose(v.T @ v, v_ref.T @ v_ref, atol=1e-5, err_msg=what)
        same_on_all_ranks(comm, np.r_[w, lam], f"weights+eigenvalues {what}")
        layouts.append(f"{what}->{opt.resolved_mode}")
    return f"sharded P={p} " + " ".join(layouts)


def check_memory(comm):
    """mode="sharded": state bytes per rank ≤ 1.1 × (P=1 bytes)/P (model ≥ 100k params);
    mode="replicated": every rank holds the P=1 bytes."""
    model = mlp(hidden=(512, 200))
    n = model.count_params()
    assert n >= 100_000, n
    sizes = {}
    for mode, rank_comm in (("sharded", LocalComm()), ("sharded", comm), ("replicated", comm)):
        opt = DHO2(base="adam", k=10, mode=mode, comm=rank_comm)
        opt.build(model.trainable_variables)
        sizes[mode, rank_comm.size] = opt.state_bytes()
    single, mine = sizes["sharded", 1], sizes["sharded", comm.size]
    worst = comm.allreduce(tf.constant([float(mine)]), "sum", name="test/mem").numpy()[0]
    assert mine <= 1.1 * single / comm.size, (mine, single, comm.size)
    assert sizes["replicated", comm.size] == single, sizes
    return f"memory P={comm.size} n={n} bytes/rank={mine} single={single} " \
           f"ratio={mine * comm.size / single:.4f} total={worst:.0f}"


STEP_COLLECTIVES = ("dho2/gradient", "dho2/project_g", "dho2/project_u", "dho2/delta")


def step_collectives(counting):
    """{(kind, name)} of the collectives in the traced train step."""
    return sorted({(kind, name) for kind, name, _ in counting.calls if name in STEP_COLLECTIVES})


def check_replicated(comm):
    """replicated equals sharded (weights to 1e-6) after a refresh and 20 steps, on the same
    data and seed, with one gradient allreduce per step instead of sharded's collectives."""
    p, r = comm.size, comm.rank
    steps = 21                       # refresh before update 1 (W = 2), then 20 updates
    x, y = data(steps * p * B)
    mine = np.concatenate([np.arange(s * p * B + r * B, s * p * B + (r + 1) * B)
                           for s in range(steps)])
    ese = (x[r * B:(r + 1) * B], y[r * B:(r + 1) * B])
    optimizer_module.IN_PLACE_MIN_SIZE = 1     # Adam's fused in-place kernel on this small model
    report = []
    for base in ("adam", "momentum"):
        runs = {}
        for mode in ("sharded", "replicated"):
            model = mlp()
            counting = CountingComm(comm)
            opt = DHO2(learning_rate=0.05, base=base, k=3, ell=1, alpha=0.2, refresh_every=100,
                       warmup=2, mode=mode, comm=counting)
            model.compile(optimizer=opt, loss=LOSS)
            model.fit(x[mine], y[mine], batch_size=B, shuffle=False, verbose=0,
                      callbacks=[CurvatureRefresh(batch=ese)])
            assert opt.refresh_index() == 1 and int(opt.iterations.numpy()) == steps
            assert opt.state.in_place     # linear bases always, Adam above the (lowered) size
            assert opt.state.eigenvectors.shape[1] == (opt.spec.n if mode == "replicated" else
                                                  opt.layout.shard_size)
            runs[mode] = (flat(model), opt.state.eigenvalues.numpy(), step_collectives(counting))
        (w_s, lam_s, coll_s), (w_r, lam_r, coll_r) = runs["sharded"], runs["replicated"]
        rel = np.max(np.abs(w_r - w_s)) / np.max(np.abs(w_s))
        assert rel < 1e-6, f"{base}: replicated differs from sharded: rel {rel:.3g}"
        # The same Lanczos iteration, with the basis whole (replicated) or split (sharded):
        # equal up to the summation order of the float32 basis products.
        np.testing.assert_allclose(lam_r, lam_s, rtol=1e-5, atol=1e-6 * np.max(np.abs(lam_s)))
        assert coll_r == [("allreduce", "dho2/gradient")], coll_r
        expected = [("allgather", "dho2/delta"), ("allreduce", "dho2/project_g"),
                    ("reducescatter", "dho2/gradient")]
        if base == "adam":
            expected.insert(2, ("allreduce", "dho2/project_u"))
        assert coll_s == expected, coll_s
        same_on_all_ranks(comm, w_r, f"replicated weights {base}")
        report.append(f"{base} rel={rel:.1e} collectives {len(coll_r)} vs {len(coll_s)}")
    return f"replicated P={p} " + "; ".join(report)


def check_auto(comm):
    """mode="auto": every rank resolves the same layout from the budget, before any step."""
    model = mlp(hidden=(64,))
    chosen = []
    for budget in (1, 1 << 30):
        opt = DHO2(base="adam", k=4, memory_budget=budget, comm=comm)
        opt.build(model.trainable_variables)
        chosen.append(opt.resolved_mode)
        assert opt.get_config()["mode"] == "auto"
        state = opt.export_state()
        assert state["__mode__"] == opt.resolved_mode
        assert state["eigenvectors_shard:0"].shape == (4, opt.spec.n)
    assert chosen == ["sharded", "replicated"], chosen
    everyone = comm.allgather_object(chosen, name="test/auto")
    assert all(c == chosen for c in everyone), everyone
    return f"auto P={comm.size} {chosen}"


def check_faithful(comm):
    """Every rank holds identical weights, eigenvalues and full V after windows."""
    x, y = data(comm.size * 40 * B)
    x_r, y_r = x[comm.rank::comm.size], y[comm.rank::comm.size]
    model = mlp()
    model.compile(optimizer=DHO2(learning_rate=0.01, base="adam", k=3, mode="faithful",
                                 refresh_every=10, warmup=0, comm=comm), loss=LOSS)
    model.fit(x_r, y_r, batch_size=B, shuffle=False, verbose=0,
              callbacks=[CurvatureRefresh(batch=(x_r[:B], y_r[:B]))])
    opt = model.optimizer
    assert int(opt.distribution.jumps.numpy()) == 4 and opt.refresh_index() == 5   # t = 0, 9, ..., 39
    assert opt.state.eigenvectors.shape[1] == opt.spec.n        # full V on every rank
    same_on_all_ranks(comm, np.r_[flat(model), opt.state.eigenvalues.numpy(),
                                  opt.state.eigenvectors.numpy().ravel()], "faithful state")
    return f"faithful P={comm.size}"


class StepTimes(tf.keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.rows, self.trigger_weights = [], {}

    def on_train_batch_begin(self, batch, logs=None):
        opt = self.model.optimizer
        t = int(opt.iterations.numpy())
        self.rows.append((time.time(), t))
        if opt.triggers and opt.triggers[-1] == t:
            self.trigger_weights[t] = flat(self.model)


def check_pipelined(comm, curvature_ranks):
    # Lanczos at every refresh: the last delivery is compared with a synchronous Lanczos run.
    opt = DHO2(learning_rate=0.05, base="momentum", k=3, mode="pipelined",
               curvature_ranks=curvature_ranks, refresh_every=10, warmup=5, delivery_delay=5,
               refresh_method="lanczos", comm=comm)
    groups = opt.distribution.groups_in(comm)   # before build: the world of comm
    model = mlp()
    model.compile(optimizer=opt, loss=LOSS)
    x, y = data(len(groups.update) * 40 * B)      # 40 steps on every update rank
    c_batches = [data(2 * B, seed=1000 + c) for c in range(curvature_ranks)]
    record = StepTimes()
    if opt.is_curvature_rank:
        c_index = groups.curvature.index(comm.rank)
        opt.bind(model, LOSS, c_batches[c_index])
        served = opt.serve_curvature()
        mine = {"served": served}
    else:
        u = comm.rank
        x_u, y_u = x[u::len(groups.update)], y[u::len(groups.update)]
        model.fit(x_u, y_u, batch_size=B, shuffle=False, verbose=0,
                  callbacks=[CurvatureRefresh(batch=(x_u[:B], y_u[:B])), record])
        mine = {"rows": record.rows, "triggers": opt.triggers,
                "trigger_weights": record.trigger_weights}
    everyone = comm.allgather_object(mine, name="test/pipelined/info")
    served = [e["served"] for e in everyone if "served" in e]
    u0 = everyone[0]
    assert u0["triggers"] == [4, 14, 24, 34], u0["triggers"]
    assert all(len(s) == 4 for s in served), served
    # Update ranks kept stepping while the curvature ranks computed.
    for rnd in served[0]:
        during = [t for (stamp, t) in u0["rows"] if rnd["start"] < stamp < rnd["end"]]
        assert len(during) >= 1, f"no update step during refresh {rnd}"
    # The last delivery equals a synchronous refresh at the last trigger's weights.
    if not opt.is_curvature_rank:
        theta = u0["trigger_weights"][34]
        ref_model = mlp()
        offset = 0
        for var in ref_model.trainable_variables:
            size = int(np.prod(var.shape))
            var.assign(theta[offset:offset + size].reshape(var.shape))
            offset += size
        xs = np.concatenate([b[0] for b in c_batches])
        ys = np.concatenate([b[1] for b in c_batches])
        ref = estimate_spectrum(make_hvp_fn(ref_model, LOSS, (xs, ys)), offset, 3, 0,
                                LocalComm(), seed=opt.seed + 3)
        np.testing.assert_allclose(opt.state.eigenvalues.numpy(), ref.eigenvalues.numpy(),
                                   rtol=1e-5)
        v = gather_vectors(opt.state.eigenvectors.value(), offset, comm,
                           process_set=opt.distribution.group).numpy()
        v_ref = ref.vectors_r.numpy()
        np.testing.assert_allclose(v.T @ v, v_ref.T @ v_ref, atol=1e-5)
        same_on_all_ranks_u = comm.allgather(
            tf.constant(flat(model)[None, :]), name="test/pipelined/weights",
            process_set=opt.distribution.group).numpy()
        assert np.all(same_on_all_ranks_u == same_on_all_ranks_u[0])
    comm.barrier("test/pipelined/end")
    return f"pipelined P={comm.size} P_C={curvature_ranks} steps_during_refresh=" + ",".join(
        str(len([1 for (s, _) in u0["rows"] if r["start"] < s < r["end"]])) for r in served[0])


def check_admm(comm):
    """Convex least squares split across ranks: z → global solution; 1 allreduce per τ steps."""
    d, rows, tau = 8, 64, 4
    rng = np.random.default_rng(7)
    x_all = rng.standard_normal((comm.size * rows, d)).astype("float32")
    y_all = (x_all @ rng.standard_normal(d) + 0.1 * rng.standard_normal(len(x_all))).astype(
        "float32")[:, None]
    x_r, y_r = x_all[comm.rank * rows:(comm.rank + 1) * rows], y_all[
        comm.rank * rows:(comm.rank + 1) * rows]
    w_star = np.linalg.lstsq(x_all.astype(np.float64), y_all.astype(np.float64), rcond=None)[0]
    mse = tf.keras.losses.MeanSquaredError()
    counts = {}
    for mode in ("sharded", "admm"):
        tf.keras.utils.set_random_seed(0)
        model = tf.keras.Sequential([tf.keras.Input((d,)),
                                     tf.keras.layers.Dense(1, use_bias=False)])
        counting = CountingComm(comm)
        opt = DHO2(learning_rate=0.1, base="sgd", k=2, alpha=0.5, mode=mode, rho=1.0, tau=tau,
                   refresh_every=10_000, warmup=1, comm=counting)
        opt.bind(model, mse, (x_r, y_r))
        # ADMM: 32 rounds. z approaches the solution geometrically (about x0.75 per round):
        # after 32 rounds it is within 3e-6 (P = 2), 6e-6 (P = 3) and 1e-5 (P = 4) of it, ten
        # times inside the 1e-4 asserted below (a wrong consensus stays far outside it).
        steps = 32 * tau if mode == "admm" else 4 * tau + 1
        for t in range(steps):
            opt.on_step_begin()
            if t == 1:
                counting.reset()          # count steady-state steps only (after the refresh)
            with tf.GradientTape() as tape:
                loss = mse(y_r, model(x_r))
            opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                    model.trainable_variables))
            opt.on_step_end()
            if t == 4 * tau:
                counts[mode] = counting.count("allreduce") / (4 * tau - 1 + 1)
        if mode == "admm":
            z = opt.distribution.z.numpy()
            err = np.max(np.abs(z - w_star[:, 0]))
            assert err < 1e-4, f"z is {err:.3g} from the least-squares solution"
            same_on_all_ranks(comm, z, "z")
            dual_sum = comm.allreduce(opt.distribution.dual.value(), "sum", name="test/dual").numpy()
            assert np.max(np.abs(dual_sum)) < 1e-4, dual_sum
    assert counts["admm"] * tau == 1.0, counts
    assert counts["admm"] <= counts["sharded"] / tau, counts
    return f"admm P={comm.size} allreduce/step admm={counts['admm']} sharded={counts['sharded']}"


def check_misconfig(comm):
    """Bad configurations raise a clear error on every rank before any collective."""
    caught = []
    for kwargs in (dict(mode="pipelined", curvature_ranks=comm.size),
                   dict(mode="pipelined", curvature_ranks=1, update_ranks=comm.size + 1),
                   dict(mode="admm", tau=0), dict(mode="admm", rho=0.0), dict(mode="bogus")):
        try:
            DHO2(comm=comm, **kwargs)
        except ValueError as err:
            caught.append(str(err))
    print(f"rank {comm.rank} caught {len(caught)}: " + " | ".join(caught), flush=True)
    assert len(caught) == 5, caught
    return f"misconfig P={comm.size}"


def check_contract(comm, curvature_ranks):
    """The Keras optimizer contract for mode="pipelined" (tests/parallel/contract_pipelined.py)
    on 2 update ranks and 1 curvature rank; every rank prints ``CONTRACT <check> OK|FAIL``."""
    from tests.parallel import contract_pipelined

    assert (comm.size, curvature_ranks) == (3, contract_pipelined.CURVATURE_RANKS), \
        "the contract check runs at P = 3 with one curvature rank"
    failed = contract_pipelined.run_checks(comm, list(contract_pipelined.CHECKS))
    assert not failed, f"contract checks failed on rank {comm.rank}: {failed}"
    return f"contract P={comm.size} checks={len(contract_pipelined.CHECKS)}"


CHECKS = {"comm": check_comm, "sharded": check_sharded, "replicated": check_replicated, "auto": check_auto,
          "memory": check_memory, "faithful": check_faithful, "admm": check_admm,
          "pipelined": check_pipelined, "misconfig": check_misconfig, "contract": check_contract}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checks", nargs="+", choices=["all", *CHECKS])
    parser.add_argument("--curvature-ranks", type=int, default=None)
    args = parser.parse_args()
    checks = [c for c in CHECKS if c != "contract"] if "all" in args.checks else args.checks
    world = int(os.environ["HOROVOD_SIZE"])
    curvature_ranks = args.curvature_ranks or max(1, world // 2)
    # Horovod registers process sets at start-up only: the pipelined mode's, for every check.
    comm = HorovodComm(process_sets=pipeline_process_sets(curvature_ranks))
    for name in checks:
        if comm.rank == 0:
            print(f"MODES_CHECK_START {name} P={comm.size}", flush=True)
        in_place_min_size = optimizer_module.IN_PLACE_MIN_SIZE
        try:
            if name in ("comm", "pipelined", "contract"):
                message = CHECKS[name](comm, curvature_ranks)
            else:
                message = CHECKS[name](comm)
        except BaseException:
            print(f"MODES_CHECK_FAIL {name} P={comm.size} rank={comm.rank}\n"
                  f"{traceback.format_exc()}", flush=True)
            raise
        finally:
            optimizer_module.IN_PLACE_MIN_SIZE = in_place_min_size   # checks stay independent
        comm.barrier(f"test/end/{name}")
        if comm.rank == 0:
            print(f"MODES_CHECK_OK {message}", flush=True)


if __name__ == "__main__":
    main()
