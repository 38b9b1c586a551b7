"""Keras callbacks: DHO2's curvature refresh in ``model.fit``, initial broadcast, replica
synchronisation at epoch ends and the test-accuracy clock."""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from dho2_tf.curvature_input import mixed_precision_message
from dho2_tf.distributed.comm import Communicator
from dho2_tf.state_transfer import average_variables
from dho2_tf.validation import check_int, check_real

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

    The step count is kept as a Python int (advanced by the number of steps Keras reports per
    batch call, re-read from the optimizer at the first batch of every epoch), so a batch with no
    refresh due reads no variable and forces no host synchronisation.

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
        self._iterations: int | None = None   # optimizer steps done, None: re-read
        self._batch_begin = 0

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
        opt.build(self.model.trainable_variables)
        opt.verify_consistency(self.model, fit={key: self.params.get(key)
                                                for key in ("steps", "epochs")})
        if self.broadcast_initial_state:
            opt.broadcast_state(self.model)
            opt.hooks.weights_synced = True
        opt.bind(self.model, self.loss, self.batch, training=self.training)
        opt.hooks.driver = self
        if opt.hooks.ensure_shadows() and self.model.non_trainable_variables:
            # A train function traced before the copies existed would not restore the
            # statistics of a skipped step: use a new one (fit looks it up every step).
            self.model.train_function = self.model.make_train_function(force=True)
        self._iterations = None

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        # Other callbacks may have restored or averaged state since the last batch. Re-read it
        # here rather than in the first batch hook, whose time Keras compares with the batch
        # time (the "on_train_batch_begin is slow" warning).
        self._iterations = self._opt.sync_host_state()

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        opt = self._opt
        if self._iterations is None:
            self._iterations = opt.sync_host_state()
        self._batch_begin = batch
        before = opt.last_refresh
        opt.on_step_begin(self._iterations)
        if opt.last_refresh is not before:
            info = dict(opt.last_refresh)
            self.refreshes.append(info)
            if self.on_refresh is not None:
                self.on_refresh(info)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        opt = self._opt
        # Keras passes the first step of the call to the begin hook and the last to this one.
        self._iterations += batch - self._batch_begin + 1
        before = opt.last_refresh
        opt.on_step_end(self._iterations)
        if opt.last_refresh is not before:   # a pipelined delivery can land here too
            self.refreshes.append(dict(opt.last_refresh))

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._opt.hooks.report_skipped()

    def on_train_end(self, logs: dict | None = None) -> None:
        opt = self._opt or self._optimizer()
        opt.on_train_end()
        if opt.hooks.driver is self:
            opt.hooks.driver = None


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


class TestAccuracyClock(tf.keras.callbacks.Callback):
    """Evaluate after every epoch with the clock stopped; stop at a target.

    The training clock runs from the start of ``fit`` and excludes evaluation time, so
    ``history`` gives test accuracy (and, with ``train_data``, the full training-set loss)
    against pure training wall time. Each epoch end appends a row: ``epoch``, ``seconds``
    (training time so far), ``test_accuracy`` (NaN for a model compiled without an accuracy
    metric), ``test_loss``, ``train_loss`` (the compiled loss, regularisation terms included,
    over all of ``train_data`` at the epoch's final weights; NaN without ``train_data``) and
    ``epoch_loss`` (Keras' mean of the epoch's minibatch losses). At most one target is
    allowed; ``time_to_target`` is the training time of the first epoch that meets it.

    Args:
        x_test: test inputs (every rank evaluates the full test set; weights are replicated).
        y_test: test targets.
        target_accuracy: stop training once test accuracy reaches this value (optional).
        batch_size: evaluation batch size.
        train_data: ``(x, targets)`` of the full training set, evaluated every epoch.
        target_loss: stop training once the ``train_data`` loss is <= this value (optional).
    """

    def __init__(self, x_test: Any, y_test: Any, target_accuracy: float | None = None,
                 batch_size: int = 1000, *, train_data: tuple[Any, Any] | None = None,
                 target_loss: float | None = None) -> None:
        super().__init__()
        if len(x_test) != len(y_test) or len(x_test) == 0:
            raise ValueError("`x_test` and `y_test` must be non-empty with the same number of "
                             f"rows. Received: {len(x_test)} and {len(y_test)}")
        if target_accuracy is not None:
            check_real("target_accuracy", target_accuracy, minimum=0.0, maximum=1.0)
        if train_data is not None and not (isinstance(train_data, (tuple, list))
                                           and len(train_data) == 2
                                           and len(train_data[0]) == len(train_data[1]) > 0):
            raise ValueError("`train_data` must be an (x, targets) pair, non-empty with the same "
                             f"number of rows. Received: {_rows_of(train_data)}")
        if target_loss is not None:
            check_real("target_loss", target_loss, minimum=0.0, open_min=True)
            if train_data is None:
                raise ValueError("`target_loss` needs `train_data` (the loss is evaluated on "
                                 "the full training set). Received: train_data=None")
            if target_accuracy is not None:
                raise ValueError("Set at most one of `target_accuracy` and `target_loss`. "
                                 f"Received: target_accuracy={target_accuracy}, "
                                 f"target_loss={target_loss}")
        self.x_test, self.y_test = x_test, y_test
        self.train_data = train_data
        self.target_accuracy, self.target_loss = target_accuracy, target_loss
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.history: list[dict[str, float]] = []
        self.time_to_target: float | None = None

    def on_train_begin(self, logs: dict | None = None) -> None:
        import time

        self._clock = time.perf_counter
        # Work an optimizer did for this run before the clock's own hook (DHO2 compiles its
        # curvature graphs when CurvatureRefresh binds it) is training time too.
        compiled = getattr(self.model.optimizer, "compile_seconds", 0.0) or 0.0
        self._start = self._clock() - float(compiled)
        self._paused = 0.0

    def _evaluate(self, x: Any, y: Any) -> dict[str, float]:
        """The compiled loss and metrics over all of ``(x, y)`` (replicated weights)."""
        return self.model.evaluate(x, y, batch_size=self.batch_size, verbose=0,
                                   return_dict=True)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        pause = self._clock()
        train_seconds = pause - self._start - self._paused
        weights = getattr(self.model.optimizer, "evaluation_weights", contextlib.nullcontext)
        with weights():
            test = self._evaluate(self.x_test, self.y_test)
            train = None if self.train_data is None else self._evaluate(*self.train_data)
        if self.target_accuracy is not None and "accuracy" not in test:
            raise ValueError("`target_accuracy` needs a model compiled with an accuracy "
                             f"metric; the evaluation reports only {sorted(test)}.")
        accuracy = float(test.get("accuracy", np.nan))
        train_loss = np.nan if train is None else float(train["loss"])
        row = {"epoch": epoch + 1, "seconds": train_seconds, "test_accuracy": accuracy,
               "test_loss": float(test["loss"]), "train_loss": train_loss,
               "epoch_loss": float((logs or {}).get("loss", np.nan))}
        self.history.append(row)
        if logs is not None:
            if "accuracy" in test:
                logs["test_accuracy"] = accuracy
            logs["test_loss"] = row["test_loss"]
            if train is not None:
                logs["train_loss"] = train_loss
        reached = (self.target_accuracy is not None and accuracy >= self.target_accuracy) or \
            (self.target_loss is not None and train_loss <= self.target_loss)
        if reached and self.time_to_target is None:
            self.time_to_target = train_seconds
            self.model.stop_training = True
        self._paused += self._clock() - pause


def _rows_of(pair: Any) -> str:
    """Row counts of an (x, y) pair for an error message."""
    if not isinstance(pair, (tuple, list)):
        return type(pair).__name__
    return f"{len(pair)} item(s) with {[len(item) for item in pair]} rows"


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
