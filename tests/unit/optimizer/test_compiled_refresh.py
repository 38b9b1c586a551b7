"""The curvature graphs are compiled when DHO2 is bound, once, and reused by every refresh."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from dho2_tf import DHO2
from dho2_tf.distributed import LocalComm
from dho2_tf.refresh import basis_dtype


def _model_and_batch():
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([tf.keras.layers.Dense(16, "tanh", input_shape=(8,)),
                                 tf.keras.layers.Dense(3)])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    y = rng.integers(0, 3, 64)
    return model, tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), (x, y)


def test_bind_compiles_once_and_refreshes_reuse_the_graph() -> None:
    model, loss, batch = _model_and_batch()
    opt = DHO2(learning_rate=0.1, base="momentum", k=3, refresh_every=1, warmup=0,
               comm=LocalComm())
    opt.bind(model, loss, batch)
    program = opt.binding["estimator"].program
    assert opt.compile_seconds > 0.0 and program._run.experimental_get_tracing_count() == 1
    assert opt.curvature_metrics()["curvature_compile_seconds"] == opt.compile_seconds
    for _ in range(3):
        info = opt.refresh_curvature()
        assert info["installed"] and info["status"] == "ok"
    assert program._run.experimental_get_tracing_count() == 1
    assert opt.refresh_index() == 3


def test_basis_dtype_follows_the_model_unless_set() -> None:
    model, loss, batch = _model_and_batch()
    opt = DHO2(k=3, comm=LocalComm())
    opt.bind(model, loss, batch)
    assert opt.binding["estimator"].program.basis_dtype == tf.float32
    assert basis_dtype(opt.lanczos_dtype, tf.float64) == "float64"
    forced = DHO2(k=3, lanczos_dtype="float64", comm=LocalComm())
    assert basis_dtype(forced.lanczos_dtype, tf.float32) == "float64"
    assert DHO2.from_config(forced.get_config()).lanczos_dtype == "float64"


def test_lanczos_dtype_is_validated() -> None:
    import pytest

    with pytest.raises(ValueError, match="`lanczos_dtype` must be None, 'float32' or 'float64'. "
                                         "Received: lanczos_dtype='float16'"):
        DHO2(lanczos_dtype="float16")


def test_binding_the_same_model_and_batch_again_keeps_the_compiled_graphs() -> None:
    model, loss, batch = _model_and_batch()
    opt = DHO2(k=3, comm=LocalComm())
    opt.bind(model, loss, batch)
    estimator = opt.binding["estimator"]
    opt.bind(model, loss, batch)  # what a second model.fit call does
    assert opt.binding["estimator"] is estimator
    other = (batch[0][:32], batch[1][:32])
    opt.bind(model, loss, other)
    assert opt.binding["estimator"] is not estimator


def test_both_hvp_methods_give_the_same_eigenpairs_and_the_choice_is_kept() -> None:
    model, loss, batch = _model_and_batch()
    eigenvalues = {}
    for method in ("reverse-over-reverse", "forward-over-reverse"):
        opt = DHO2(k=3, hvp_method=method, lanczos_dtype="float64", comm=LocalComm())
        opt.bind(model, loss, batch)
        assert opt.refresh_curvature()["installed"]
        metrics = opt.curvature_metrics()
        eigenvalues[method] = np.array([metrics[f"eigenvalue_{j}"] for j in range(3)])
        assert DHO2.from_config(opt.get_config()).hvp_method == method
    assert np.all(np.abs(eigenvalues["reverse-over-reverse"]) > 1e-3)
    np.testing.assert_allclose(eigenvalues["forward-over-reverse"],
                               eigenvalues["reverse-over-reverse"], rtol=1e-5)
    assert DHO2(comm=LocalComm()).hvp_method == "forward-over-reverse"


def test_hvp_method_is_validated() -> None:
    import pytest

    with pytest.raises(ValueError, match="`hvp_method` must be one of .* Received: "
                                         "hvp_method='forward'"):
        DHO2(hvp_method="forward")
