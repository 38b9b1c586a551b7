"""Driving DHO2 from a custom training loop: one context manager that calls every hook.

``fit`` gets the curvature refresh, the initial broadcast and the mode's hooks from
:class:`dho2_tf.CurvatureRefresh`; a loop of one's own gets them from :func:`training_loop`::

    with dho2_tf.training_loop(opt, model, loss_fn, (x_curv, y_curv)) as loop:
        for x, y in batches:
            loop.step(train_step, x, y)     # train_step: your tf.function calling apply_gradients

Entering the loop builds and binds the optimizer, checks that the ranks agree on its
configuration and broadcasts rank 0's weights; each :meth:`TrainingLoop.step` runs what the
optimizer's ``on_step_begin`` runs (refresh, window jump, pipeline hand-over), the user's step
and what ``on_step_end`` runs (ADMM consensus rounds); leaving the block normally runs
``on_train_end`` (ADMM: the consensus weights go into the model; pipelined: the curvature ranks
are released).

``mode="pipelined"``: on a curvature rank, entering the loop serves curvature until the update
ranks leave theirs, and its steps then do nothing (``loop.trains`` is False), so the same loop
runs on every rank.

The loop is a thin shell over the optimizer's :class:`dho2_tf.host_driver.HostDriver`, the
driver ``fit``'s :class:`dho2_tf.CurvatureRefresh` uses too: the same start, the same hooks and
the same step count.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import tensorflow as tf

from dho2_tf.callbacks import first_batch

logger = logging.getLogger(__name__)


class TrainingLoop:
    """The hooks of one optimizer around the steps of a custom loop (see the module docstring).

    Attributes:
        optimizer: the bound :class:`dho2_tf.DHO2`.
        model: the model it trains.
        trains: False on a pipelined curvature rank (its steps do nothing).
        served: the refreshes a pipelined curvature rank served (records of
            :meth:`dho2_tf.DHO2.serve_curvature`).
    """

    def __init__(self, optimizer: Any, model: tf.keras.Model, loss: Callable | str | None,
                 batch: Any, *, training: bool = True,
                 broadcast_initial_state: bool = True) -> None:
        from dho2_tf.optimizer import DHO2

        if not isinstance(optimizer, DHO2):
            raise TypeError("training_loop drives a dho2_tf.DHO2 optimizer. Received: "
                            f"optimizer={type(optimizer).__name__}")
        self.optimizer, self.model, self.loss = optimizer, model, loss
        self.batch = first_batch(batch)
        self.training = training
        self.broadcast_initial_state = broadcast_initial_state
        self.trains = True
        self.served: list[dict[str, Any]] = []
        self._active = False

    @property
    def iterations(self) -> int:
        """Optimizer steps done: the driver's Python count (no variable is read per step)."""
        return self.optimizer.driver.step_count()

    def __enter__(self) -> "TrainingLoop":
        driver = self.optimizer.driver
        if driver.driven_by is not None:
            raise RuntimeError("This optimizer is already driven by another training loop or "
                               "by fit(); leave that one first.")
        self.trains = driver.start(self.model, self.loss, self.batch, training=self.training,
                                   broadcast_initial_state=self.broadcast_initial_state,
                                   driven_by=self)
        self.served = driver.served
        self._active = True
        return self

    def step(self, step_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``step_fn(*args, **kwargs)`` (one ``apply_gradients``) between the optimizer's
        ``on_step_begin`` and ``on_step_end``; returns what ``step_fn`` returns (``None`` on a
        pipelined curvature rank, where nothing runs)."""
        if not self._active:
            raise RuntimeError("loop.step() runs inside `with dho2_tf.training_loop(...) as "
                               "loop:` only.")
        if not self.trains:
            return None
        driver = self.optimizer.driver
        driver.before_step()
        out = step_fn(*args, **kwargs)
        driver.after_step(1)
        return out

    def report_skipped(self) -> int:
        """Log the steps skipped since the last report (rank 0; ``fit`` does it after every
        epoch, leaving the loop does it once more); returns how many."""
        return self.optimizer.driver.report_skipped() if self.trains else 0

    def sync(self) -> None:
        """Re-read the step count after the optimizer's or model's variables were changed
        outside a step (a checkpoint restored, statistics averaged):
        :meth:`dho2_tf.host_driver.HostDriver.resync`."""
        if self.trains:
            self.optimizer.driver.resync()

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        driver = self.optimizer.driver
        self._active = False
        driver.release(self)
        if kind is None:
            driver.finish()


def training_loop(optimizer: Any, model: tf.keras.Model, loss: Callable | str | None,
                  batch: Any, *, training: bool = True,
                  broadcast_initial_state: bool = True) -> TrainingLoop:
    """A context manager that drives ``optimizer`` in a custom loop (:class:`TrainingLoop`).

    Args:
        optimizer: the :class:`dho2_tf.DHO2` the loop's step applies.
        model: the model it trains (its ``trainable_variables``, in order).
        loss: the loss whose Hessian is estimated, ``loss(y_true, y_pred)``, a Keras loss name,
            or ``None`` for the model's compiled loss.
        batch: this rank's fixed curvature batch ``(x, y)`` (or a dataset whose first element
            is used); a row holding NaN/Inf is a ValueError.
        training: run the model in training mode in the Hessian-vector products.
        broadcast_initial_state: copy rank 0's weights to every training rank on entering (the
            first step checks that the ranks agree when this is off).

    Raises:
        ValueError: at the first step of a multi-rank run whose ranks hold different weights;
            TypeError for an optimizer that is not DHO2.
    """
    return TrainingLoop(optimizer, model, loss, batch, training=training,
                        broadcast_initial_state=broadcast_initial_state)
