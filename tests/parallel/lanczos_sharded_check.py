"""Under horovodrun: sharded Lanczos equals single-process Lanczos on the mean operator, the
compiled program equals the eager reference, and the replicated basis equals the sharded one;
the warm-started block refresh (sharded and replicated basis, mean and root-0 HVP reduction)
equals the single-process one, and its staleness check is bitwise the same on every rank.

Run: ``horovodrun --gloo -np P -H localhost:P python tests/parallel/lanczos_sharded_check.py``.
Every rank's HVP operator is a different symmetric matrix A_r (common spikes + rank-seeded Wigner
noise); the sharded run must reproduce a ``LocalComm`` run on (1/P) Σ_r A_r computed inside this
script. n = 301 is divisible by neither 2 nor 3. With P = 3 the check is repeated on the process
set {1, 2} (its root is global rank 1). Exits non-zero on any failure; rank 0 prints
``lanczos_sharded_check OK`` at the end.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import tensorflow as tf

from dho2_tf.curvature import extreme_eigenpairs, gather_vectors, lanczos
from dho2_tf.curvature.lanczos_reference import lanczos_eager
from dho2_tf.curvature.warm_start import BlockRitzProgram, WarmStart
from dho2_tf.distributed import HorovodComm, LocalComm

N, K, ELL, M, SEED = 301, 4, 1, 20, 123
SPIKES = np.array([-7.0, 4.0, 5.0, 6.0, 8.0])  # well separated from the bulk (radius ≤ 2)
OK_LINE = "lanczos_sharded_check OK"


def rank_matrix(rank: int) -> np.ndarray:
    """A_r = U diag(SPIKES) Uᵀ (shared) + (G_r + G_rᵀ)/√(2n) (rank-seeded)."""
    u, _ = np.linalg.qr(np.random.default_rng(1000).standard_normal((N, len(SPIKES))))
    g = np.random.default_rng(rank).standard_normal((N, N))
    return (u * SPIKES) @ u.T + (g + g.T) / np.sqrt(2 * N)


def matrix_operator(a: np.ndarray, dtype: tf.DType):
    a_tf = tf.constant(a, dtype)
    return lambda v: tf.linalg.matvec(a_tf, tf.cast(v, dtype))


def _max_rel(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(x - ref).max() / np.abs(ref).max())


def warm_start(ranks: list[int], layout_columns) -> WarmStart:
    """The K extreme eigenvectors of a perturbed mean operator (the previous refresh's pairs),
    as ``layout_columns`` gives them to this rank."""
    mean = sum(rank_matrix(r) for r in ranks) / len(ranks)
    g = np.random.default_rng(77).standard_normal((N, N))
    w, s = np.linalg.eigh(mean + 0.05 * (g + g.T) / np.sqrt(2 * N))
    sel = np.r_[0:ELL, N - K:N]
    return WarmStart(layout_columns(tf.constant(s[:, sel].T)), np.ones(K + ELL, bool), w[sel])


def check_warm(comm: HorovodComm, ranks: list[int], process_set, tag: str,
               references: dict) -> dict[str, bool]:
    """The warm refresh at P ranks against the single-process one on the mean (or root's)
    operator (``references``, see :func:`single_process_references`), for both basis layouts
    and both HVP reductions."""
    name = f"dho2/test/{tag}/warm"
    checks = {}
    for layout in ("sharded", "replicated"):
        for reduce in ("mean", "root0"):
            program = BlockRitzProgram(matrix_operator(rank_matrix(comm.rank), tf.float64), N, K,
                                       ELL, comm, extra=2, process_set=process_set,
                                       hvp_dtype=tf.float64, basis_layout=layout,
                                       hvp_reduce=reduce, name=f"{name}/{layout}/{reduce}")
            start = warm_start(ranks, program.ops.local_rows)
            check = program.check(start, seed=SEED)
            est = program.refine(check)
            staleness = comm.allgather(tf.constant([check.staleness]),
                                       name=f"{name}/{layout}/{reduce}/s",
                                       process_set=process_set).numpy()
            vectors = est.vectors_r if layout == "replicated" else gather_vectors(
                est.vectors_r, N, comm, process_set, name=f"{name}/{layout}/{reduce}/v")
            ref = references[f"warm {reduce}"]
            v, v_ref = vectors.numpy().astype(np.float64), ref["vectors"]
            key = f"warm {layout}/{reduce}"
            checks.update({
                f"{key}: status": est.status == "ok" == ref["status"] and est.hvps == 2 * (
                    K + ELL + 2),
                f"{key}: lambda = single-process (rel 1e-6)": _max_rel(
                    est.eigenvalues.numpy(), ref["eigenvalues"]) <= 1e-6,
                f"{key}: residuals = single-process": np.allclose(
                    est.residuals, ref["residuals"], rtol=1e-6, atol=1e-9),
                f"{key}: projectors = single-process (1e-6)": np.abs(
                    v.T @ v - v_ref.T @ v_ref).max() <= 1e-6,
                f"{key}: staleness bitwise equal on ranks": bool(
                    np.all(staleness == staleness[0])),
                f"{key}: staleness = single-process (1e-10)": abs(
                    check.staleness - ref["staleness"]) <= 1e-10,
            })
    return checks


def single_process_references(ranks: list[int]) -> dict:
    """The single-process (``LocalComm``) results a group of ``ranks`` is compared with, as
    numpy: Lanczos and its extreme pairs on the mean operator (1/P) Σ_r A_r, and the warm
    refresh on the mean operator (``warm mean``) and on the root's A_{ranks[0]} (``warm
    root0``). They are the same on every rank, so one rank computes them (see :func:`main`)."""
    mean = sum(rank_matrix(r) for r in ranks) / len(ranks)
    local = LocalComm()
    ref = lanczos(matrix_operator(mean, tf.float64), N, M, local, seed=SEED,
                  hvp_dtype=tf.float64)
    ref_est = extreme_eigenpairs(ref, K, ELL, local)
    out = {"lanczos": {"status": ref.status, "tridiagonal": ref.tridiagonal.numpy(),
                       "basis": ref.basis_r.numpy(), "eigenvalues": ref_est.eigenvalues.numpy(),
                       "vectors": ref_est.vectors_r.numpy().astype(np.float64)}}
    for reduce, operator in (("mean", mean), ("root0", rank_matrix(ranks[0]))):
        program = BlockRitzProgram(matrix_operator(operator, tf.float64), N, K, ELL, local,
                                   extra=2, hvp_dtype=tf.float64)
        check = program.check(warm_start(ranks, lambda x: x), seed=SEED)
        est = program.refine(check)
        out[f"warm {reduce}"] = {"status": est.status, "staleness": check.staleness,
                                 "eigenvalues": est.eigenvalues.numpy(),
                                 "residuals": np.asarray(est.residuals),
                                 "vectors": est.vectors_r.numpy().astype(np.float64)}
    return out


def check_group(comm: HorovodComm, ranks: list[int], process_set, tag: str,
                references: dict) -> list[str]:
    """Run every collective of one group check, then return the failed checks (strings)
    against the group's single-process ``references``."""
    name = f"dho2/test/{tag}"
    res = lanczos(matrix_operator(rank_matrix(comm.rank), tf.float64), N, M, comm, seed=SEED,
                  process_set=process_set, hvp_dtype=tf.float64, name=f"{name}/lanczos")
    est = extreme_eigenpairs(res, K, ELL, comm, process_set=process_set, name=f"{name}/ritz")
    q_r = res.basis_r.numpy()
    qqt = comm.allreduce(tf.constant(q_r @ q_r.T), "sum", name=f"{name}/qqt",
                         process_set=process_set).numpy()
    v_full = gather_vectors(est.vectors_r, N, comm, process_set, name=f"{name}/v").numpy()
    every_lambda = comm.allgather(est.eigenvalues[None], name=f"{name}/lambda",
                                  process_set=process_set).numpy()
    every_t = comm.allgather(res.tridiagonal[None], name=f"{name}/t",
                             process_set=process_set).numpy()
    res32 = lanczos(matrix_operator(rank_matrix(comm.rank), tf.float32), N, M, comm, seed=SEED,
                    process_set=process_set, name=f"{name}/lanczos32")
    est32 = extreme_eigenpairs(res32, K, ELL, comm, process_set=process_set,
                               name=f"{name}/ritz32")

    eager = lanczos_eager(matrix_operator(rank_matrix(comm.rank), tf.float64), N, M, comm,
                          seed=SEED, process_set=process_set, hvp_dtype=tf.float64,
                          name=f"{name}/eager")
    replicated = lanczos(matrix_operator(rank_matrix(comm.rank), tf.float64), N, M, comm,
                         seed=SEED, process_set=process_set, hvp_dtype=tf.float64,
                         basis_layout="replicated", name=f"{name}/replicated")
    est_rep = extreme_eigenpairs(replicated, K, ELL, LocalComm())
    rep32 = lanczos(matrix_operator(rank_matrix(comm.rank), tf.float32), N, M, comm, seed=SEED,
                    process_set=process_set, basis_dtype="float32", name=f"{name}/basis32")

    mean = sum(rank_matrix(r) for r in ranks) / len(ranks)
    ref = references["lanczos"]
    w = np.linalg.eigvalsh(mean)
    true_extremes = np.concatenate([w[:ELL], w[N - K:]])
    v_ref = ref["vectors"]
    v = v_full.astype(np.float64)
    size = len(ranks)
    s = -(-N // size)
    start = ranks.index(comm.rank) * s
    checks = {
        "status": res.status == "ok" == ref["status"] and res.num_steps == M,
        "T rel 1e-10": _max_rel(res.tridiagonal.numpy(), ref["tridiagonal"]) <= 1e-10,
        "compiled T = eager T (1e-10)": eager.status == "ok" and np.abs(
            res.tridiagonal.numpy() - eager.tridiagonal.numpy()).max() <= 1e-10,
        "compiled basis = eager basis (1e-10)": np.abs(
            q_r - eager.basis_r.numpy()).max() <= 1e-10,
        "replicated T = sharded T (1e-10)": replicated.status == "ok" and np.abs(
            replicated.tridiagonal.numpy() - res.tridiagonal.numpy()).max() <= 1e-10,
        "replicated V = gathered sharded V (1e-6)": np.abs(
            est_rep.vectors_r.numpy() - v_full).max() <= 1e-6,
        "fp32 basis Ritz values rel 1e-5": rep32.status == "ok" and _max_rel(
            np.linalg.eigvalsh(rep32.tridiagonal.numpy())[-K:],
            np.linalg.eigvalsh(res.tridiagonal.numpy())[-K:]) <= 1e-5,
        "Ritz values (fp64) rel 1e-8": _max_rel(np.linalg.eigvalsh(res.tridiagonal.numpy()),
                                               np.linalg.eigvalsh(ref["tridiagonal"]))
        <= 1e-8,
        "lambda vs eigh(mean) rel 1e-6": np.allclose(est.eigenvalues.numpy(), true_extremes,
                                                     rtol=1e-6, atol=0),
        "lambda vs single-process rel 1e-6": np.allclose(est.eigenvalues.numpy(),
                                                         ref["eigenvalues"],
                                                         rtol=1e-6, atol=0),
        "basis shard = reference columns": np.allclose(
            q_r, np.pad(ref["basis"], ((0, 0), (0, size * s - N)))[:, start:start + s],
            rtol=0, atol=1e-8),
        "QQ^T = I (1e-10)": np.abs(qqt - np.eye(M)).max() <= 1e-10,
        "VV^T = I (1e-6)": np.abs(v @ v.T - np.eye(K + ELL)).max() <= 1e-6,
        "gram = VV^T": np.allclose(est.gram.numpy(), v @ v.T, rtol=0, atol=1e-6),
        "projectors V^T V (1e-6)": np.abs(v.T @ v - v_ref.T @ v_ref).max() <= 1e-6,
        "lambda bitwise equal on ranks": bool(np.all(every_lambda == every_lambda[0])),
        "T bitwise equal on ranks": bool(np.all(every_t == every_t[0])),
        "fp32 HVP lambda rel 1e-5": res32.status == "ok" and np.allclose(
            est32.eigenvalues.numpy(), true_extremes, rtol=1e-5, atol=0),
        **check_warm(comm, ranks, process_set, tag, references),
    }
    return [f"{tag} rank {comm.rank}: {key}" for key, passed in checks.items() if not passed]


def main() -> int:
    # Process sets must be registered at hvd.init, before the size is known from Horovod.
    sets = [[1, 2]] if os.environ.get("HOROVOD_SIZE") == "3" else []
    comm = HorovodComm(process_sets=sets)
    if comm.size < 2:
        raise RuntimeError("Run under horovodrun with -np 2 or more.")
    # Each group's single-process references are computed by the group's first rank (rank 0
    # for all ranks, rank 1 for the set {1, 2}: side by side) and broadcast to every rank.
    groups = [("all", list(range(comm.size)))] + ([("set12", sets[0])] if sets else [])
    mine = {tag: single_process_references(ranks) for tag, ranks in groups
            if comm.rank == ranks[0]}
    references = {tag: comm.broadcast_object(mine.get(tag), ranks[0],
                                             name=f"dho2/test/{tag}/references")
                  for tag, ranks in groups}
    failures = check_group(comm, list(range(comm.size)), None, "all", references["all"])
    checked = ["all ranks"]
    if sets:
        group = comm.group(sets[0])
        checked.append(f"process set {sets[0]}")
        if group.includes(comm.rank):
            failures += check_group(comm, sets[0], group, "set12", references["set12"])
    every = [f for rank_failures in comm.allgather_object(failures, name="dho2/test/failures")
             for f in rank_failures]
    comm.barrier("dho2/test/barrier")
    if every:
        raise AssertionError("lanczos_sharded_check failed:\n" + "\n".join(every))
    if comm.rank == 0:
        print(f"{OK_LINE} (P={comm.size}, n={N}, m={M}, k={K}, ell={ELL}; "
              f"groups: {', '.join(checked)})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
