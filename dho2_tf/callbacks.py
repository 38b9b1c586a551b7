"""Keras callbacks: DHO2's curvature refresh in ``model.fit``, initial broadcast, replica
synchronisation at epoch ends and the test-accuracy clock (:mod:`dho2_tf.clock`, re-exported)."""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from dho2_tf.clock import TestAccuracyClock as TestAccuracyClock  # re-exported
from dho2_tf.curvature_input import mixed_precision_message
from dho2_tf.distributed.comm import Communicator
from dho2_tf.state_transfer import average_variables

logger = logging.getLogger(__name__)


def first_batch(data: Any) -> tuple[Any, Any]:
    """``(x, y)`` from a tuple of arrays/tensors or the first element of a ``tf.data.Dataset``."""
    if isinstance(data, tf.data.Dataset):
        element = next(iter(data))
        if not isinstance(element, (tuple, list)) or len(element) < 2:
            raise ValueError("The curvature dataset must yield (x, y) pairs.")
        return element[0], element[1]
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
        rows_x, rows_y = _rows(x), _rows(y)
        if len(set(rows_x + rows_y)) > 1:
            raise ValueError("The curvature batch's inputs and labels must all have the same "
                             f"number of rows. Received: x rows {rows_x}, y rows {rows_y} (for "
                             "a multi-output model, pass the labels as a tuple or dict of "
                             "arrays, one per output).")
        if not rows_x or rows_x[0] == 0:
            raise ValueError("The curvature batch is empty.")
        return x, y
    raise ValueError("`batch` must be an (x, y) pair or a tf.data.Dataset of (x, y). "
                     f"Received: {type(data).__name__}")


def _rows(part: Any) -> list[int]:
    """Number of rows of every array in ``part`` (an array or a tuple/list/dict of them)."""
    return [len(leaf) for leaf in tf.nest.flatten(part)]


class CurvatureRefresh(tf.keras.callbacks.Callback):
    """Run DHO2's curvature refresh on schedule during ``model.fit``.

    At the start of training it builds the optimizer, broadcasts the model weights and optimizer
    state from rank 0 (so all ranks start identical) and binds the model, loss and curvature batch
    to the optimizer. Under ``horovodrun`` it turns ``fit``'s progress bar off on every rank but
    0. A model compiled under a mixed-precision policy is refused (ValueError naming it). Before every batch it runs the refresh when the optimizer's schedule says
    one is due (every rank runs it at the same step, since the step counter is replicated).

    It is a thin shell over the optimizer's :class:`dho2_tf.host_driver.HostDriver` (the one a
    custom loop's :func:`dho2_tf.training_loop` uses): the driver keeps the step count as a
    Python int (advanced by the number of steps Keras reports per batch call, re-read from the
    optimizer at the start of every epoch and whenever ``optimizer.sync_host_state()`` is
    called), so a batch with no refresh due reads no variable and forces no host
    synchronisation.

    Example::

        opt = dho2_tf.DHO2(learning_rate=1e-3, base="adam", k=10)
        model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
        model.fit(x, y, callbacks=[dho2_tf.CurvatureRefresh(batch=(x[:256], y[:256]))])

    Args:
        batch: this rank's fixed curvature batch, ``(x, y)`` or a dataset whose first element
            is used.
        loss: loss for the Hessian, ``None`` for the model's compiled loss.
        training: run the model in training mode during Hessian-vector products.
        broadcast_initial_state: broadcast weights and optimizer state from rank 0 at start.
        on_refresh: optional ``fn(info: dict)`` called after each refresh (e.g. for logging).
    """

    def __init__(self, batch: Any, loss: Callable | str | None = None, training: bool = True,
                 broadcast_initial_state: bool = True,
                 on_refresh: Callable[[dict], None] | None = None) -> None:
        super().__init__()
        # The hooks ignore ``logs``, so Keras need not convert them to numpy every batch.
        self._supports_tf_logs = True
        self.batch = first_batch(batch)
        self.loss = loss
        self.training = training
        self.broadcast_initial_state = broadcast_initial_state
        self.on_refresh = on_refresh
        self.refreshes: list[dict] = []
        self._opt: Any = None
        self._batch_begin = 0   # Keras' index of the first batch of the current call

    def _optimizer(self):
        from dho2_tf.optimizer import DHO2

        opt = self.model.optimizer
        if isinstance(getattr(opt, "inner_optimizer", None), DHO2):   # Keras' LossScaleOptimizer
            raise ValueError(mixed_precision_message(
                "the model was compiled under the Keras policy "
                f"{tf.keras.mixed_precision.global_policy().name!r}, so Keras wrapped DHO2 in "
                f"{type(opt).__name__}"))
        if not isinstance(opt, DHO2):
            raise TypeError("CurvatureRefresh needs a model compiled with dho2_tf.DHO2. "
                            f"Received optimizer: {type(opt).__name__}")
        return opt

    def set_params(self, params: dict) -> None:
        """Keras' run parameters; on a rank other than 0 ``verbose`` becomes 0 in the shared
        dict, so the progress bar Keras adds after this callback prints on rank 0 only."""
        super().set_params(params)
        from dho2_tf.optimizer import DHO2

        opt = getattr(self.model, "optimizer", None)
        if isinstance(opt, DHO2) and params.get("verbose") and not opt.comm.is_root:
            params["verbose"] = 0

    def on_train_begin(self, logs: dict | None = None) -> None:
        opt = self._opt = self._optimizer()
        if opt.is_curvature_rank:
            raise RuntimeError(
                f"DHO2 mode='pipelined': rank {opt.comm.rank} is a curvature rank, which serves "
                "refreshes instead of training: call optimizer.bind(model, loss, batch) and "
                "optimizer.serve_curvature() there instead of fit(), or drive every rank with "
                "dho2_tf.training_loop, which does so.")
        driver, shadows = opt.driver, opt.driver.shadows
        driver.start(self.model, self.loss, self.batch, training=self.training,
                     broadcast_initial_state=self.broadcast_initial_state, driven_by=self,
                     fit={key: self.params.get(key) for key in ("steps", "epochs")})
        if driver.shadows is not shadows and self.model.non_trainable_variables:
            # A train function traced before the copies existed would not restore the
            # statistics of a skipped step: use a new one (fit looks it up every step).
            self.model.train_function = self.model.make_train_function(force=True)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        # Other callbacks may have restored or averaged state since the last batch. Re-read it
        # here rather than in the first batch hook, whose time Keras compares with the batch
        # time (the "on_train_batch_begin is slow" warning).
        self._opt.driver.resync()

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        opt = self._opt
        self._batch_begin = batch
        before = opt.last_refresh
        opt.driver.before_step()
        if opt.last_refresh is not before:
            info = dict(opt.last_refresh)
            self.refreshes.append(info)
            if self.on_refresh is not None:
                self.on_refresh(info)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        opt = self._opt
        before = opt.last_refresh
        # Keras passes the first step of the call to the begin hook and the last to this one.
        opt.driver.after_step(batch - self._batch_begin + 1)
        if opt.last_refresh is not before:   # a pipelined delivery can land here too
            self.refreshes.append(dict(opt.last_refresh))

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._opt.driver.report_skipped()

    def on_train_end(self, logs: dict | None = None) -> None:
        opt = self._opt or self._optimizer()
        opt.driver.finish()
        opt.driver.release(self)


def curvature_batch_from_arrays(x: np.ndarray, y: np.ndarray, size: int, seed: int = 0, *,
                                comm: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """The fixed curvature batch of ``size`` rows of ``(x, y)``, or this rank's part of it.

    The rows are :func:`dho2_tf.data_position.curvature_rows`: the first ``size`` of
    the permutation drawn from ``(seed, CURVATURE_TAG)``, sorted, the same for any number of
    ranks. With ``comm`` (anything with ``rank`` r and ``size`` P), rank r gets its slice
    ``rank_rows(size, r, P)`` of them (the first ``size mod P`` ranks one row more), so the
    ranks together bind exactly those rows. DHO2 averages the ranks' Hessians, so when P does
    not divide ``size`` the rows of the smaller slices weigh slightly more.

    Raises:
        ValueError: when ``size`` is not in [1, len(x)], or is below the number of ranks.
    """
    from dho2_tf.data_position import curvature_rows, rank_curvature_rows

    if comm is None:
        rows = curvature_rows(len(x), size, seed)
    else:
        rows = rank_curvature_rows(len(x), size, int(comm.rank), int(comm.size), seed)
    return x[rows], y[rows]


class BroadcastInitialState(tf.keras.callbacks.Callback):
    """Copy the model weights from rank 0 to every rank when training starts.

    DHO2's :class:`CurvatureRefresh` does this itself; baseline optimizers use this callback.

    Args:
        comm: the communicator.
    """

    def __init__(self, comm: Any) -> None:
        super().__init__()
        self.comm = comm

    def on_train_begin(self, logs: dict | None = None) -> None:
        if self.comm.size == 1:
            return
        for i, var in enumerate(self.model.variables):
            var.assign(self.comm.broadcast(var.value(), 0, name=f"dho2/initial_weights/{i}"))


class ReplicaSync(tf.keras.callbacks.Callback):
    """Keep the training ranks consistent around the per-epoch evaluation.

    With ``phase="before"`` (put it before ``TestAccuracyClock``) it averages the model's
    non-trainable variables (batch-norm moving statistics, computed by each rank from its own
    batches) over the ranks, so every rank evaluates the same model. With ``phase="after"`` (put
    it after the clock) every rank takes rank 0's early-stopping decision, so no rank leaves
    ``fit`` while the others wait in a collective.

    Args:
        comm: communicator.
        process_set: the ranks that run ``fit`` (``None``: all; must contain rank 0).
        phase: ``"before"`` or ``"after"`` the evaluation.
    """

    def __init__(self, comm: Communicator, process_set: Any = None, phase: str = "before"
                 ) -> None:
        super().__init__()
        self.comm, self.process_set, self.phase = comm, process_set, phase

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.phase == "after":
            stop = self.comm.broadcast(tf.constant([float(bool(self.model.stop_training))]), 0,
                                       name="dho2/experiment/stop", process_set=self.process_set)
            self.model.stop_training = bool(stop.numpy()[0] > 0.5)
            return
        average_variables(self.model.non_trainable_variables, self.comm,
                          "dho2/experiment/model_statistics", self.process_set)
