"""The curvature refresh's pieces around the Lanczos run: what it is bound to, what it reports.

A refresh reads top-down: :meth:`dho2_tf.DHO2.on_step_begin` asks the mode, whose schedule
(:func:`dho2_tf.hybrid.next_refresh_step`) says a refresh is due; the mode folds the momentum
out of the old basis and runs the compiled estimator of the :func:`bind_curvature` binding; the
optimizer installs the eigenpairs (:meth:`dho2_tf.optimizer_state.OptimizerState.install`) and
records the refresh (:func:`refresh_record`).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import tensorflow as tf

from dho2_tf.losses import resolve_loss

logger = logging.getLogger(__name__)

MISSING_BINDING = ("DHO2 needs a model, loss and batch for curvature: call "
                   "optimizer.bind(model, loss, (x, y)) first, or pass "
                   "dho2_tf.CurvatureRefresh(batch=(x, y)) to fit().")


def basis_dtype(lanczos_dtype: str | None, model_dtype: tf.DType) -> str:
    """The Lanczos basis dtype: ``lanczos_dtype``, or the model's precision when None."""
    if lanczos_dtype is not None:
        return lanczos_dtype
    return "float64" if tf.as_dtype(model_dtype) == tf.float64 else "float32"


def binding_key(model: tf.keras.Model, loss: Any, batch: tuple, training: bool) -> tuple:
    """Identifies a binding, so binding the same model, loss and batch again is a no-op."""
    source = model.compiled_loss if loss is None else loss
    return (id(model), id(source), tuple(id(part) for part in batch), training)


def bind_curvature(model: tf.keras.Model, loss: Callable | str | None, batch: tuple,
                   training: bool, make_estimator: Callable[..., Any],
                   lanczos_dtype: str | None) -> dict[str, Any]:
    """The HVP of ``loss`` at ``model`` on ``batch`` and the mode's compiled estimator.

    Traces the HVP and the Lanczos loop now (no HVP runs, no collective), so the first refresh
    costs what later ones do; ``compile_seconds`` in the result is that one-off cost.

    Returns:
        ``{"model", "dtype", "hvp", "estimator", "key", "batch", "compile_seconds"}``;
        ``estimator`` is ``None`` on a rank that never estimates.
    """
    from dho2_tf.curvature.hvp import make_hvp_fn

    loss_fn = resolve_loss(model, loss)
    dtype = model.trainable_variables[0].dtype
    hvp = make_hvp_fn(model, loss_fn, batch, training=training, hvp_dtype=dtype)
    estimator = make_estimator(hvp, dtype, basis_dtype(lanczos_dtype, dtype))
    return {"model": model, "dtype": dtype, "hvp": hvp, "estimator": estimator,
            "key": binding_key(model, loss, batch, training), "batch": batch,
            "compile_seconds": 0.0 if estimator is None else estimator.trace()}


def refresh_record(index: int, status: str, installed: bool, start: float | None,
                   eigenvalues: tf.Variable, scale: tf.Variable, is_root: bool) -> dict[str, Any]:
    """What refresh ``index`` did (``last_refresh``), logged on rank 0."""
    record = {"index": index, "status": status, "installed": installed,
              "seconds": 0.0 if start is None else time.perf_counter() - start,
              "eigenvalues": eigenvalues.numpy().copy(), "scale": float(scale.numpy())}
    if is_root:
        logger.info("DHO2 refresh %d (%.2fs, %s): eigenvalues %s, c=%.3g", index,
                    record["seconds"], status, record["eigenvalues"], record["scale"])
    return record


def warn_no_curvature_source(step: int, base: str) -> None:
    """The warning when a refresh is due but nothing is bound (every rank, once)."""
    logger.warning(
        "DHO2 step %d: a curvature refresh is due but no curvature source is bound, so "
        "DHO2 trains as its plain base optimizer (%r) with no second-order step. Pass "
        "callbacks=[dho2_tf.CurvatureRefresh(batch=(x, y))] to fit(), or call "
        "optimizer.bind(model, loss, (x, y)) and the step hooks in a custom loop.", step, base)
