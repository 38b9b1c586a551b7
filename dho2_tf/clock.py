"""Time to target: a training clock that stops while the model is evaluated.

:class:`TimeToTargetClock` is the clock, a Keras callback: the training time since
:meth:`~TimeToTargetClock.start` less the time spent inside
:meth:`~TimeToTargetClock.paused` blocks (the evaluations), a target (a test accuracy to reach
or a training loss to get down to) and ``time_to_target``, the clock reading at which the
target was first met, when it stops ``fit``. Subclasses decide when and how to evaluate:
:class:`TestAccuracyClock` evaluates after every epoch on every rank with ``model.evaluate``
and keeps one history row per epoch; the prioritized-SGD benchmark's clock
(``benchmarks/prioritized/harness.py``) evaluates every few steps on rank 0.

Math: with pauses [a_j, b_j) between the start s and now t,
``elapsed(t) = (t − s) − Σ_{b_j ≤ t} (b_j − a_j)``; inside a pause the reading is the one at its
start, ``elapsed(a_j)``.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator

import numpy as np
import tensorflow as tf

from dho2_tf.validation import check_int, check_real


class TimeToTargetClock(tf.keras.callbacks.Callback):
    """A training clock with evaluations off it and a target that stops ``fit``.

    Args:
        target_accuracy: the test accuracy to reach, in [0, 1] (optional).
        target_loss: the training loss to get down to, > 0 (optional; at most one target).
        timer: the time source, seconds as a float (``time.perf_counter``; tests inject a
            fake one).

    Attributes:
        time_to_target: clock seconds when the target was first met, ``None`` until then.
    """

    def __init__(self, target_accuracy: float | None = None, target_loss: float | None = None,
                 *, timer: Callable[[], float] = time.perf_counter) -> None:
        super().__init__()
        if target_accuracy is not None:
            check_real("target_accuracy", target_accuracy, minimum=0.0, maximum=1.0)
        if target_loss is not None:
            check_real("target_loss", target_loss, minimum=0.0, open_min=True)
            if target_accuracy is not None:
                raise ValueError("Set at most one of `target_accuracy` and `target_loss`. "
                                 f"Received: target_accuracy={target_accuracy}, "
                                 f"target_loss={target_loss}")
        if not callable(timer):
            raise ValueError(f"`timer` must be callable. Received: {timer!r}")
        self.target_accuracy, self.target_loss = target_accuracy, target_loss
        self.time_to_target: float | None = None
        self._timer = timer
        self._start = self._paused = 0.0

    def start(self, seconds_so_far: float = 0.0) -> None:
        """(Re)start the clock now, reading ``seconds_so_far`` (work already done for the run)."""
        self._start, self._paused = self._timer() - float(seconds_so_far), 0.0

    def elapsed(self) -> float:
        """Clock seconds since :meth:`start`, paused time excluded."""
        return self._timer() - self._start - self._paused

    @contextlib.contextmanager
    def paused(self) -> Iterator[float]:
        """Stop the clock for the block; yields the reading at the pause (``elapsed()``)."""
        at = self._timer()
        try:
            yield at - self._start - self._paused
        finally:
            self._paused += self._timer() - at

    def target_met(self, accuracy: float = np.nan, loss: float = np.nan) -> bool:
        """Whether ``accuracy`` ≥ ``target_accuracy`` or ``loss`` ≤ ``target_loss`` (a NaN
        never meets a target; no target, never met)."""
        return bool((self.target_accuracy is not None and accuracy >= self.target_accuracy)
                    or (self.target_loss is not None and loss <= self.target_loss))

    def reach(self, seconds: float) -> None:
        """The target was met at clock reading ``seconds``: the first time, record it and stop
        ``fit`` (a later ``fit`` with the same clock trains on)."""
        if self.time_to_target is None:
            self.time_to_target = seconds
            self.model.stop_training = True


class TestAccuracyClock(TimeToTargetClock):
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
        timer: the clock's time source (see :class:`TimeToTargetClock`).
    """

    __test__ = False  # a callback, not a pytest test class

    def __init__(self, x_test: Any, y_test: Any, target_accuracy: float | None = None,
                 batch_size: int = 1000, *, train_data: tuple[Any, Any] | None = None,
                 target_loss: float | None = None,
                 timer: Callable[[], float] = time.perf_counter) -> None:
        if len(x_test) != len(y_test) or len(x_test) == 0:
            raise ValueError("`x_test` and `y_test` must be non-empty with the same number of "
                             f"rows. Received: {len(x_test)} and {len(y_test)}")
        if train_data is not None and not (isinstance(train_data, (tuple, list))
                                           and len(train_data) == 2
                                           and len(train_data[0]) == len(train_data[1]) > 0):
            raise ValueError("`train_data` must be an (x, targets) pair, non-empty with the same "
                             f"number of rows. Received: {_rows_of(train_data)}")
        super().__init__(target_accuracy, target_loss, timer=timer)
        if target_loss is not None and train_data is None:
            raise ValueError("`target_loss` needs `train_data` (the loss is evaluated on "
                             "the full training set). Received: train_data=None")
        self.x_test, self.y_test = x_test, y_test
        self.train_data = train_data
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.history: list[dict[str, float]] = []

    def on_train_begin(self, logs: dict | None = None) -> None:
        # Work an optimizer did for this run before the clock's own hook (DHO2 compiles its
        # curvature graphs when CurvatureRefresh binds it) is training time too.
        compiled = getattr(self.model.optimizer, "compile_seconds", 0.0) or 0.0
        self.start(float(compiled))

    def _evaluate(self, x: Any, y: Any) -> dict[str, float]:
        """The compiled loss and metrics over all of ``(x, y)`` (replicated weights)."""
        return self.model.evaluate(x, y, batch_size=self.batch_size, verbose=0,
                                   return_dict=True)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        with self.paused() as train_seconds:
            weights = getattr(self.model.optimizer, "evaluation_weights",
                              contextlib.nullcontext)
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
            if self.target_met(accuracy, train_loss):
                self.reach(train_seconds)


def _rows_of(pair: Any) -> str:
    """Row counts of an (x, y) pair for an error message."""
    if not isinstance(pair, (tuple, list)):
        return type(pair).__name__
    return f"{len(pair)} item(s) with {[len(item) for item in pair]} rows"
