"""T1/T3 (single process): Lanczos basis, tridiagonal, stop conditions and validation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from dho2_tf.curvature import lanczos
from dho2_tf.distributed import LocalComm

N = 200
REPO = Path(__file__).resolve().parents[3]


def _matrix_operator(a: np.ndarray, dtype: tf.DType = tf.float64):
    a_tf = tf.constant(a, dtype)
    return lambda v: tf.linalg.matvec(a_tf, tf.cast(v, dtype))


def _symmetric(n: int, eigenvalues: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A = U diag(λ) Uᵀ with a random orthogonal U; returns (A, U)."""
    u, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    a = (u * eigenvalues) @ u.T
    return 0.5 * (a + a.T), u


def _spread_spectrum(n: int) -> np.ndarray:
    return np.concatenate([np.linspace(-1.0, 1.0, n - 4), [3.0, 4.0, 6.0, 9.0]])


def test_t3_basis_orthonormal_and_tridiagonal_is_projection() -> None:
    a, _ = _symmetric(N, _spread_spectrum(N), seed=0)
    res = lanczos(_matrix_operator(a), N, 30, LocalComm(), seed=3, hvp_dtype=tf.float64)
    assert res.status == "ok" and res.num_steps == 30
    assert res.tridiagonal.dtype == tf.float64 and res.basis_r.dtype == tf.float64
    q, t = res.basis_r.numpy(), res.tridiagonal.numpy()
    assert q.shape == (30, N) and t.shape == (30, 30)
    assert np.abs(q @ q.T - np.eye(30)).max() <= 1e-10
    np.testing.assert_allclose(q @ a @ q.T, t, atol=1e-10)
    np.testing.assert_array_equal(np.triu(t, 2), 0.0)
    np.testing.assert_array_equal(t, t.T)
    assert np.all(np.diag(t, 1) > 0)


def test_start_vector_is_seeded_normal_draw() -> None:
    res = lanczos(_matrix_operator(np.eye(N) * 2.0), N, 1, LocalComm(), seed=7,
                  hvp_dtype=tf.float64)
    q0 = np.random.default_rng(7).standard_normal(N)
    np.testing.assert_array_equal(res.basis_r.numpy()[0], q0 / np.linalg.norm(q0))
    np.testing.assert_allclose(res.tridiagonal.numpy(), [[2.0]], rtol=1e-14)


def test_same_seed_gives_identical_result_and_seed_matters() -> None:
    a, _ = _symmetric(N, _spread_spectrum(N), seed=1)
    runs = [lanczos(_matrix_operator(a), N, 12, LocalComm(), seed=s, hvp_dtype=tf.float64)
            for s in (5, 5, 6)]
    np.testing.assert_array_equal(runs[0].tridiagonal.numpy(), runs[1].tridiagonal.numpy())
    np.testing.assert_array_equal(runs[0].basis_r.numpy(), runs[1].basis_r.numpy())
    assert not np.allclose(runs[0].tridiagonal.numpy(), runs[2].tridiagonal.numpy())


def test_float32_hvp_path_is_accurate_to_float32() -> None:
    a, _ = _symmetric(N, _spread_spectrum(N), seed=2)
    res = lanczos(_matrix_operator(a, tf.float32), N, 30, LocalComm(), seed=3)
    assert res.basis_r.dtype == tf.float64
    q = res.basis_r.numpy()
    assert np.abs(q @ q.T - np.eye(30)).max() <= 1e-10  # fp64 basis even with fp32 HVPs
    top = np.linalg.eigvalsh(res.tridiagonal.numpy())[-4:]
    np.testing.assert_allclose(top, [3.0, 4.0, 6.0, 9.0], rtol=1e-5)


def test_breakdown_on_rank_three_operator_stops_early_with_exact_eigenvalues() -> None:
    a, _ = _symmetric(50, np.concatenate([np.zeros(47), [1.0, 3.0, 5.0]]), seed=4)
    res = lanczos(_matrix_operator(a), 50, 10, LocalComm(), seed=0, hvp_dtype=tf.float64)
    # Krylov space of a rank-3 operator: span{q0} + range(A), dimension 4.
    assert res.status == "breakdown at step 3"
    assert res.num_steps == 4
    assert res.tridiagonal.shape == (4, 4) and res.basis_r.shape == (4, 50)
    np.testing.assert_allclose(np.linalg.eigvalsh(res.tridiagonal.numpy()),
                               [0.0, 1.0, 3.0, 5.0], atol=1e-12)


def test_m_equal_to_n_recovers_every_eigenvalue() -> None:
    a, _ = _symmetric(12, np.arange(1.0, 13.0), seed=5)
    res = lanczos(_matrix_operator(a), 12, 12, LocalComm(), seed=0, hvp_dtype=tf.float64)
    assert res.status == "ok" and res.num_steps == 12
    np.testing.assert_allclose(np.linalg.eigvalsh(res.tridiagonal.numpy()),
                               np.arange(1.0, 13.0), rtol=1e-12)


def test_non_finite_hvp_stops_with_status() -> None:
    a, _ = _symmetric(N, _spread_spectrum(N), seed=6)
    operator = _matrix_operator(a)
    calls = tf.Variable(0, dtype=tf.int32)  # the HVP runs inside the compiled loop

    def flaky(v: tf.Tensor) -> tf.Tensor:
        count = calls.assign_add(1)
        return operator(v) * tf.where(tf.equal(count, 3), tf.constant(np.nan, tf.float64), 1.0)

    res = lanczos(flaky, N, 8, LocalComm(), seed=0, hvp_dtype=tf.float64)
    assert res.status == "non-finite HVP at step 2"
    assert res.num_steps == 2 and int(calls.numpy()) == 3
    assert res.basis_r.shape == (2, N) and res.tridiagonal.shape == (2, 2)


def test_non_finite_at_first_step_and_inf() -> None:
    res = lanczos(lambda v: v * np.inf, N, 8, LocalComm(), seed=0)
    assert res.status == "non-finite HVP at step 0"
    assert res.num_steps == 0 and res.basis_r.shape == (0, N)


@pytest.mark.parametrize("kwargs,message", [
    (dict(n=0), "`n` must be a positive integer. Received: n=0"),
    (dict(m=0), "`m` must be a positive integer. Received: m=0"),
    (dict(m=2.5), "`m` must be a positive integer. Received: m=2.5"),
    (dict(m=True), "`m` must be a positive integer. Received: m=True"),
    (dict(breakdown_tol=-1.0), "`breakdown_tol` must be non-negative. Received: "
                               "breakdown_tol=-1.0"),
])
def test_lanczos_validation_messages(kwargs: dict, message: str) -> None:
    args = dict(n=N, m=4) | kwargs
    with pytest.raises(ValueError) as err:
        lanczos(lambda v: v, args.pop("n"), args.pop("m"), LocalComm(), seed=0, **args)
    assert str(err.value) == message


def test_curvature_package_works_without_horovod() -> None:
    code = (
        "import sys; sys.modules['horovod'] = None\n"  # any `import horovod` now fails
        "import numpy as np, tensorflow as tf\n"
        "from dho2_tf.curvature import estimate_spectrum\n"
        "from dho2_tf.distributed import LocalComm\n"
        "est = estimate_spectrum(lambda v: v * tf.range(1.0, 11.0), 10, 2, 0, LocalComm(),"
        " m=10, seed=0)\n"
        "np.testing.assert_allclose(est.eigenvalues.numpy(), [9.0, 10.0], rtol=1e-5)\n"
        "assert not [m for m in sys.modules if m.startswith('horovod.')], 'horovod imported'\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


# ----------------------------------------------------------------- the compiled program
def test_compiled_tridiagonal_equals_eager_reference() -> None:
    from dho2_tf.curvature.lanczos_reference import lanczos_eager

    a, _ = _symmetric(N, _spread_spectrum(N), seed=8)
    for m in (5, 30):
        fast = lanczos(_matrix_operator(a), N, m, LocalComm(), seed=4, hvp_dtype=tf.float64)
        slow = lanczos_eager(_matrix_operator(a), N, m, LocalComm(), seed=4,
                             hvp_dtype=tf.float64)
        assert fast.status == slow.status == "ok" and fast.num_steps == slow.num_steps == m
        np.testing.assert_allclose(fast.tridiagonal.numpy(), slow.tridiagonal.numpy(),
                                   rtol=0, atol=1e-10)
        np.testing.assert_allclose(fast.basis_r.numpy(), slow.basis_r.numpy(), atol=1e-10)


def test_compiled_breakdown_matches_eager_reference() -> None:
    from dho2_tf.curvature.lanczos_reference import lanczos_eager

    u, _ = np.linalg.qr(np.random.default_rng(2).standard_normal((50, 3)))
    a = (u * np.array([1.0, 2.0, 5.0])) @ u.T
    fast = lanczos(_matrix_operator(a), 50, 10, LocalComm(), seed=0, hvp_dtype=tf.float64)
    slow = lanczos_eager(_matrix_operator(a), 50, 10, LocalComm(), seed=0, hvp_dtype=tf.float64)
    assert fast.status == slow.status and fast.status.startswith("breakdown")
    np.testing.assert_allclose(fast.tridiagonal.numpy(), slow.tridiagonal.numpy(), atol=1e-10)


def test_program_is_traced_once_and_reused_across_runs() -> None:
    from dho2_tf.curvature.lanczos import LanczosProgram

    a, _ = _symmetric(N, _spread_spectrum(N), seed=9)
    program = LanczosProgram(_matrix_operator(a), N, 12, LocalComm(), hvp_dtype=tf.float64)
    assert program.trace() > 0.0
    first, second = program.run(seed=1), program.run(seed=2)
    assert program._run.experimental_get_tracing_count() == 1
    ref = lanczos(_matrix_operator(a), N, 12, LocalComm(), seed=2, hvp_dtype=tf.float64)
    np.testing.assert_array_equal(second.tridiagonal.numpy(), ref.tridiagonal.numpy())
    assert not np.allclose(first.tridiagonal.numpy(), second.tridiagonal.numpy())


def test_float32_basis_ritz_values_agree_with_float64() -> None:
    """The float32 basis keeps the extreme Ritz values to 1e-5 relative (the stated tolerance)."""
    a, _ = _symmetric(N, _spread_spectrum(N), seed=10)
    runs = {d: lanczos(_matrix_operator(a, tf.float32), N, 30, LocalComm(), seed=3,
                       basis_dtype=d) for d in ("float64", "float32")}
    assert runs["float32"].basis_r.dtype == tf.float32
    ritz = {d: np.linalg.eigvalsh(r.tridiagonal.numpy()) for d, r in runs.items()}
    top = np.abs(ritz["float64"]).max()
    np.testing.assert_allclose(ritz["float32"][-4:], ritz["float64"][-4:], rtol=0,
                               atol=1e-5 * top)
    np.testing.assert_allclose(ritz["float64"][-4:], [3.0, 4.0, 6.0, 9.0], rtol=1e-6)
    q = runs["float32"].basis_r.numpy().astype(np.float64)
    np.testing.assert_allclose(q @ q.T, np.eye(30), atol=1e-5)


def test_replicated_basis_equals_sharded_in_one_process() -> None:
    a, _ = _symmetric(N, _spread_spectrum(N), seed=11)
    runs = [lanczos(_matrix_operator(a), N, 20, LocalComm(), seed=5, hvp_dtype=tf.float64,
                    basis_layout=layout) for layout in ("sharded", "replicated")]
    np.testing.assert_allclose(runs[0].tridiagonal.numpy(), runs[1].tridiagonal.numpy(),
                               atol=1e-12)


def test_trace_issues_no_collective_and_run_issues_the_stated_ones() -> None:
    """Trace: nothing. Run (sharded, one process): per step 4 collectives, plus q0 and T."""
    from dho2_tf.curvature.lanczos import LanczosProgram
    from dho2_tf.distributed import CountingComm

    a, _ = _symmetric(N, _spread_spectrum(N), seed=12)
    for layout, per_step in (("sharded", {"reducescatter": 1, "allreduce": 2, "allgather": 1}),
                             ("replicated", {"allreduce": 1})):
        comm = CountingComm(LocalComm())
        program = LanczosProgram(_matrix_operator(a), N, 10, comm, hvp_dtype=tf.float64,
                                 basis_layout=layout)
        program.trace()
        traced = {kind: comm.count(kind) for kind in per_step}
        assert traced == per_step, (layout, traced)  # recorded once, when the body is traced
        comm.reset()
        program.run(seed=0)
        assert comm.count() == 1 and comm.count("broadcast") == 1  # T, eagerly; the rest is graph


@pytest.mark.parametrize("kwargs,message", [
    (dict(basis_layout="rows"), "`basis_layout` must be one of ('sharded', 'replicated')"),
    (dict(basis_dtype="float16"), "`basis_dtype` must be one of ('float64', 'float32')"),
])
def test_program_validation_messages(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        lanczos(lambda v: v, N, 4, LocalComm(), seed=0, **kwargs)
