"""TensorBoard logging of training, curvature and priority statistics (rank 0 writes)."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
import tensorflow as tf

from dho2_tf.distributed.comm import Communicator, default_comm

logger = logging.getLogger(__name__)


def current_learning_rate(optimizer: Any) -> float | None:
    """The optimizer's learning rate at its current step (schedules evaluated), or None."""
    lr = getattr(optimizer, "_learning_rate", None)
    if lr is None:
        return None
    if isinstance(lr, tf.keras.optimizers.schedules.LearningRateSchedule):
        lr = lr(optimizer.iterations)
    try:
        return float(tf.convert_to_tensor(lr).numpy())
    except (TypeError, ValueError):
        return None


def priority_statistics(model: tf.keras.Model) -> dict[str, float]:
    """Summary of this rank's priority table for a ``PrioritizedModel`` (empty otherwise).

    Keys: ``mean``, ``std``, ``min``, ``max`` of the estimated priorities p̂(t), ``step`` and
    ``evaluations`` (per-example loss/gradient evaluations so far) of the sampler; with
    ``selection="adaptive"`` also the switch decision ``tau``, ``tau_ema``, ``importance_on`` and
    the measured ``cost_ratio`` of a full to a light step.
    """
    sampler = getattr(model, "sampler", None)
    if sampler is None or not getattr(sampler, "is_initialized", False):
        return {}
    p_hat = np.asarray(sampler.estimated_priorities().numpy(), np.float64)
    return {"mean": float(p_hat.mean()), "std": float(p_hat.std()), "min": float(p_hat.min()),
            "max": float(p_hat.max()), "step": float(sampler.step.numpy()),
            "evaluations": float(sampler.evaluations.numpy()),
            **getattr(sampler, "switch_statistics", dict)()}


def installed_curvature(metrics: dict[str, float]) -> dict[str, float]:
    """``metrics`` without the ``eigenvalue_<j>`` entries while no refresh has run (``refreshes``
    is 0): the eigenvalues are placeholders then, not estimates, and are not written."""
    if metrics.get("refreshes", 1.0):
        return metrics
    return {k: v for k, v in metrics.items() if not k.startswith("eigenvalue_")}


class TensorBoardMonitor(tf.keras.callbacks.Callback):
    """Write training, curvature and priority scalars to TensorBoard event files.

    Only rank 0 creates a writer (other ranks do nothing and issue no collectives). Tags:

    * every epoch (step = epoch index, as Keras' own TensorBoard callback): ``epoch/<key>`` for
      every Keras log entry (``loss``, ``accuracy``, ``test_accuracy``, ``test_loss`` when
      :class:`~dho2_tf.callbacks.TestAccuracyClock` runs before this callback),
      ``epoch/learning_rate`` and ``epoch/step_seconds`` (mean training-step time of the epoch).
    * every ``update_freq`` steps (step = optimizer iterations): ``batch/loss`` (Keras' running
      mean over the epoch), ``batch/learning_rate``, ``batch/step_seconds``, every key of
      ``optimizer.curvature_metrics()`` as ``curvature/<key>`` (eigenvalues from the first
      refresh on, lr scale c, refresh count and time, ADMM residuals, ...) and ``priority/<key>`` (see
      :func:`priority_statistics`; rank 0's shard).
    * at each DHO2 curvature refresh (step = iterations when it ran): ``refresh/seconds``,
      ``refresh/scale``, ``refresh/eigenvalue_<j>`` and the histogram ``refresh/ritz_values``.

    The step time is measured from the start to the end of a batch, so it excludes the
    curvature refresh, which runs in :class:`~dho2_tf.callbacks.CurvatureRefresh` before it
    (put this callback after ``CurvatureRefresh``); the refresh time is logged separately.

    Args:
        log_dir: folder for the event files (created by rank 0).
        comm: communicator (default :func:`default_comm`).
        update_freq: log the per-step tags every this many steps (≥ 1).
    """

    def __init__(self, log_dir: str | os.PathLike[str], comm: Communicator | None = None,
                 update_freq: int = 10) -> None:
        super().__init__()
        if isinstance(update_freq, bool) or not isinstance(update_freq, int) or update_freq < 1:
            raise ValueError(f"`update_freq` must be a positive integer. "
                             f"Received: update_freq={update_freq!r}")
        self.log_dir = os.fspath(log_dir)
        self.comm = comm or default_comm()
        self.update_freq = update_freq
        self.writer: Any = None
        self._last_refresh_index: int | None = None
        self._batch_start = 0.0
        self._epoch_step_seconds: list[float] = []

    def on_train_begin(self, logs: dict | None = None) -> None:
        if self.comm.is_root and self.writer is None:
            os.makedirs(self.log_dir, exist_ok=True)
            self.writer = tf.summary.create_file_writer(self.log_dir)
            logger.info("TensorBoard event files in %s", self.log_dir)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch_step_seconds = []

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        if self.writer is not None:
            self._log_refresh()
            self._batch_start = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.writer is None:
            return
        seconds = time.perf_counter() - self._batch_start
        self._epoch_step_seconds.append(seconds)
        step = int(self.model.optimizer.iterations.numpy())
        if step % self.update_freq:
            return
        scalars = {"batch/step_seconds": seconds}
        if logs and "loss" in logs:
            scalars["batch/loss"] = float(logs["loss"])
        scalars.update(self._state_scalars("batch/learning_rate"))
        self._write_scalars(scalars, step)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.writer is None:
            return
        self._log_refresh()
        scalars = {f"epoch/{key}": float(value) for key, value in (logs or {}).items()
                   if np.ndim(value) == 0}
        if self._epoch_step_seconds:
            scalars["epoch/step_seconds"] = float(np.mean(self._epoch_step_seconds))
        lr = current_learning_rate(self.model.optimizer)
        if lr is not None:
            scalars["epoch/learning_rate"] = lr
        self._write_scalars(scalars, epoch)
        self._write_scalars(self._state_scalars(None),
                            int(self.model.optimizer.iterations.numpy()))
        self.writer.flush()

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.writer is not None:
            self.writer.flush()

    def _state_scalars(self, lr_tag: str | None) -> dict[str, float]:
        optimizer = self.model.optimizer
        scalars: dict[str, float] = {}
        if lr_tag is not None:
            lr = current_learning_rate(optimizer)
            if lr is not None:
                scalars[lr_tag] = lr
        metrics = getattr(optimizer, "curvature_metrics", None)
        if callable(metrics):
            scalars.update({f"curvature/{k}": float(v) for k, v in
                            installed_curvature(metrics()).items()})
        scalars.update({f"priority/{k}": v for k, v in priority_statistics(self.model).items()})
        return scalars

    def _log_refresh(self) -> None:
        info = getattr(self.model.optimizer, "last_refresh", None)
        if not info or info.get("index") == self._last_refresh_index:
            return
        self._last_refresh_index = info.get("index")
        step = int(self.model.optimizer.iterations.numpy())
        eigenvalues = np.asarray(info.get("eigenvalues", []), np.float64).ravel()
        scalars = {f"refresh/eigenvalue_{j}": float(v) for j, v in enumerate(eigenvalues)}
        scalars["refresh/seconds"] = float(info.get("seconds", np.nan))
        if "scale" in info:
            scalars["refresh/scale"] = float(info["scale"])
        self._write_scalars(scalars, step)
        ritz = np.asarray(info.get("ritz_values", eigenvalues), np.float64).ravel()
        if ritz.size:
            with self.writer.as_default(step=step):
                tf.summary.histogram("refresh/ritz_values", ritz)

    def _write_scalars(self, scalars: dict[str, float], step: int) -> None:
        with self.writer.as_default(step=step):
            for tag, value in scalars.items():
                tf.summary.scalar(tag, value)
