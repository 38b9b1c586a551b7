"""Time-to-target-accuracy harness: prioritized SGD vs data-parallel mini-batch SGD.

Protocol (docs/algorithm.md §9.8): every method trains the same model from the same
initial weights with the same optimizer (SGD with momentum) on the same shards. The clock covers
everything a user waits for — the initial priority pass, refreshes, selection, gradients,
allreduces and Keras' per-step overhead — and excludes only (a) the test evaluations (the clock
is paused, behind a barrier) and (b) the one-off tf.function tracing, which a one-step warm-up
run on the same objects performs before the weights, optimizer state and priority table are
reset. A run that misses the target within the clock budget counts as a failure at the budget.

Cost split: every training step (prioritized and SGD) adds its in-graph time, from
``tf.timestamp`` before the selection (the batch) to after the update, to per-kind totals; the
prioritized default's light steps (uniform draws, no bookkeeping) and full steps (scores,
priority scatter, τ) are recorded apart, so the bookkeeping costs about
full_steps·(T̄_full − T̄_light) of the clock.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from dho2_tf.clock import TimeToTargetClock
from dho2_tf.distributed.comm import Communicator
from dho2_tf.models.cnn import small_cnn
from dho2_tf.training.data import shard_arrays
from dho2_tf.prioritized.model import PrioritizedModel
from dho2_tf.prioritized.sampler import PAPER, RECOMMENDED, PrioritizedSampler

logger = logging.getLogger(__name__)

LOSS = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
MAX_EPOCHS = 1_000_000  # runs end at the target or the budget (TargetClock)

#: PSGD variants: sampler keyword arguments on top of ``k`` and ``r``.
PSGD_VARIANTS: dict[str, dict[str, Any]] = {
    # The paper's released configuration: length init, projection refresh, exp-decay, top-k.
    "psgd": dict(PAPER),
    "psgd+a": {**PAPER, "aggregate_report": True},
    "psgd-is": {**PAPER, "selection": "importance", "priority": "length"},
    "psgd-is-ll": {**PAPER, "selection": "importance", "priority": "length",
                   "per_example": "last_layer"},
    # The default (recommended) configuration: importance sampling only while τ pays for its
    # measured cost, free refresh every 16th step while uniform.
    "psgd-default": dict(RECOMMENDED),
    # Importance sampling always on, priorities refreshed for free (no r% pass).
    "psgd-is-free": {**PAPER, "selection": "importance", "priority": "length",
                     "init_priority": "length", "estimator": "keep", "per_example": "last_layer",
                     "refresh": "free"},
    # Loss-ranked selection from a 3K candidate pool (Selective Backprop / online batch selection).
    "psgd-pool": {**PAPER, "selection": "pool", "priority": "loss", "init_priority": "loss",
                  "estimator": "keep", "refresh": "free"},
}

#: Benchmark tasks: the data set; ``-redundant``: the easy examples repeated; ``-noisy``: 20% of
#: the training labels replaced by another class.
TASKS = ("mnist1d", "mnist5k", "mnist1d-redundant", "mnist5k-redundant", "mnist1d-noisy",
         "mnist5k-noisy")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run.

    Attributes:
        model: ``"mlp"`` or ``"cnn"``.
        method: a key of :data:`PSGD_VARIANTS` or ``"sgd"``.
        learning_rate: SGD learning rate (momentum 0.9).
        seed: initial weights, data order and sampling seed.
        batch: global mini-batch of ``"sgd"`` (ignored by PSGD).
        k: PSGD selected fraction.
        r: PSGD refreshed fraction.
        task: a key of :data:`TASKS` (the caller loads the data; recorded in the results).
    """

    model: str
    method: str
    learning_rate: float
    seed: int
    batch: int = 0
    k: float = 0.05
    r: float = 0.01
    task: str = "mnist1d"


@dataclasses.dataclass
class RunResult:
    """Outcome of one run (identical on every rank; times are rank 0's).

    Attributes:
        spec: the run.
        ranks: number of ranks P.
        time_to_target: clock seconds until the test accuracy first reached the target, or
            ``None`` on a miss.
        init_seconds: part of the clock spent in the initial priority pass (0 for SGD).
        steps: optimizer steps taken.
        evaluations: per-example gradient evaluations over all ranks (initial pass included).
        best_accuracy: best test accuracy seen.
        n_train: training examples over all ranks.
        light_steps, full_steps: steps without / with the bookkeeping (SGD: all light).
        light_step_ms, full_step_ms: their mean in-graph time, averaged over ranks (0 when
            there was no such step).
        budget_s: the run's clock budget in seconds (a miss counts as this time).
        curve: ``(clock seconds, test accuracy)`` of every evaluation, when recorded.
    """

    spec: RunSpec
    ranks: int
    time_to_target: float | None
    init_seconds: float
    steps: int
    evaluations: int
    best_accuracy: float
    n_train: int
    light_steps: int = 0
    full_steps: int = 0
    light_step_ms: float = 0.0
    full_step_ms: float = 0.0
    budget_s: float = 0.0
    curve: list[tuple[float, float]] = dataclasses.field(default_factory=list)


def easy_examples(x: np.ndarray, y: np.ndarray, fraction: float) -> np.ndarray:
    """Indices of the ``fraction`` of (x, y) that a nearest-class-mean classifier finds easiest.

    The margin of example i is d(x_i, μ_c) − d(x_i, μ_{y_i}) for the nearest other class mean
    μ_c (class means of (x, y), Euclidean distance); the easy examples are the ⌊fraction·n⌋
    largest margins (all correctly classified when the margin is positive).
    """
    flat = np.reshape(x, (len(x), -1)).astype(np.float64)
    classes = np.unique(y)
    means = np.stack([flat[y == c].mean(axis=0) for c in classes])
    sq = (np.sum(flat ** 2, axis=1)[:, None] - 2.0 * flat @ means.T
          + np.sum(means ** 2, axis=1)[None])
    dist = np.sqrt(np.maximum(sq, 0.0))  # [n, C]
    own = dist[np.arange(len(y)), np.searchsorted(classes, y)]
    dist[np.arange(len(y)), np.searchsorted(classes, y)] = np.inf
    margin = dist.min(axis=1) - own
    return np.sort(np.argsort(-margin, kind="stable")[:math.floor(fraction * len(y))])


def with_redundancy(data: Any, repeats: int = 4, easy_fraction: float = 0.5,
                    seed: int = 0) -> Any:
    """``data`` whose training set holds each easy example ``repeats`` times (test set unchanged).

    A redundant data set any user can recognise: the easiest ``easy_fraction`` of the training
    examples (:func:`easy_examples`) appear ``repeats`` times each, the others once, rows in a
    fixed random order.

    Raises:
        ValueError: if ``repeats`` < 2 or ``easy_fraction`` is not in (0, 1].
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 2:
        raise ValueError(f"`repeats` must be an integer ≥ 2. Received: repeats={repeats!r}")
    if not 0.0 < easy_fraction <= 1.0:
        raise ValueError("`easy_fraction` must be in (0, 1]. "
                         f"Received: easy_fraction={easy_fraction!r}")
    easy = easy_examples(data.x_train, data.y_train, easy_fraction)
    rows = np.concatenate([np.arange(len(data.y_train))] + [easy] * (repeats - 1))
    rows = np.random.default_rng(seed).permutation(rows)
    return dataclasses.replace(data, x_train=data.x_train[rows], y_train=data.y_train[rows],
                               name=f"{data.name}-redundant")


def with_noisy_labels(data: Any, fraction: float = 0.2, seed: int = 0) -> Any:
    """``data`` with ⌊fraction·n⌋ training labels, chosen at random, replaced by a random other
    class (uniform over the other C − 1 classes); the test set is unchanged.

    Raises:
        ValueError: if ``fraction`` is not in (0, 1).
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
            or not 0.0 < fraction < 1.0:
        raise ValueError(f"`fraction` must be in (0, 1). Received: fraction={fraction!r}")
    rng = np.random.default_rng(seed)
    y = np.array(data.y_train, copy=True)
    noisy = rng.choice(len(y), size=math.floor(fraction * len(y)), replace=False)
    y[noisy] = (y[noisy] + rng.integers(1, data.num_classes, size=len(noisy))) \
        % data.num_classes
    return dataclasses.replace(data, y_train=y.astype(data.y_train.dtype),
                               name=f"{data.name}-noisy")


def load_task(task: str, num_samples: int = 5000) -> Any:
    """The :class:`dho2_tf.training.data.Dataset` of a benchmark task (a key of :data:`TASKS`).

    ``mnist1d``: MNIST-1D, ``num_samples`` examples, 80/20 split; ``mnist5k``: the 5,000-image
    MNIST subset (4,000 train / 1,000 test); ``-redundant``: :func:`with_redundancy` of either;
    ``-noisy``: :func:`with_noisy_labels` of either (20%).
    """
    from dho2_tf.training.data import load_mnist1d, load_mnist5k

    if task not in TASKS:
        raise ValueError(f"`task` must be one of {TASKS}. Received: task={task!r}")
    base, _, variant = task.partition("-")
    data = load_mnist1d(num_samples=num_samples) if base == "mnist1d" else load_mnist5k()
    if variant == "redundant":
        return with_redundancy(data)
    return with_noisy_labels(data) if variant == "noisy" else data


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int,
                seed: int) -> tf.keras.Model:
    """The ``"mlp"`` (MNIST-1D reference MLP of :mod:`dho2_tf.models`) or ``"cnn"``
    (:func:`dho2_tf.models.cnn.small_cnn`)."""
    tf.keras.utils.set_random_seed(seed)
    if name == "cnn":
        return small_cnn(input_shape, num_classes)
    if name == "mlp":
        from dho2_tf import models  # the repository's model zoo

        return models.get("mlp", input_shape, num_classes)
    raise ValueError(f"`model` must be one of ('mlp', 'cnn'). Received: model={name!r}")


class DataParallelModel(tf.keras.Model):
    """Mini-batch SGD baseline: Keras ``fit`` with gradients averaged over ranks by ``comm``."""

    def __init__(self, model: tf.keras.Model, comm: Communicator) -> None:
        super().__init__()
        self.model = model
        self.comm = comm
        # In-graph seconds and count of the steps (as PrioritizedSampler's light steps).
        object.__setattr__(self, "step_seconds", tf.Variable(0.0, dtype=tf.float64, trainable=False))
        object.__setattr__(self, "step_count", tf.Variable(0.0, dtype=tf.float64, trainable=False))

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        """The wrapped model's output."""
        return self.model(inputs, training=training)

    def train_step(self, data: Any) -> dict[str, tf.Tensor]:
        """One averaged mini-batch step (its in-graph time added to ``step_seconds``)."""
        started = tf.timestamp()
        with tf.control_dependencies([started]):
            x, y = tf.identity(data[0]), tf.identity(data[1])
        with tf.GradientTape() as tape:
            loss = self.compute_loss(x, y, self(x, training=True))
        variables = self.model.trainable_variables
        grads = tape.gradient(loss, variables)
        if self.comm.size > 1:
            grads = self.comm.grouped_allreduce(grads, "mean", name="dho2/bench/gradients")
        self.optimizer.apply_gradients(zip(grads, variables))
        with tf.control_dependencies([v.read_value() for v in variables]):
            self.step_seconds.assign_add(tf.timestamp() - started)
        self.step_count.assign_add(1.0)
        return {"loss": loss}


class TargetClock(TimeToTargetClock):
    """The library's time-to-target clock, evaluated every ``eval_every`` steps on rank 0.

    Rank 0 evaluates the test accuracy with the clock paused and broadcasts the decision
    (target met, budget exceeded), so every rank stops at the same step. The run starts the
    clock itself (:meth:`start`), after its warm-up; ``timer`` is the clock's time source.
    """

    def __init__(self, x_test: np.ndarray, y_test: np.ndarray, target: float, budget_s: float,
                 eval_every: int, comm: Communicator,
                 timer: Callable[[], float] = time.perf_counter) -> None:
        super().__init__(target_accuracy=target, timer=timer)
        self.x_test = tf.constant(x_test)
        self.y_test = tf.constant(y_test, tf.int64)
        self.target, self.budget_s, self.eval_every, self.comm = target, budget_s, eval_every, comm
        self.steps, self.best = 0, 0.0
        self.curve: list[tuple[float, float]] = []  # rank 0's (clock seconds, test accuracy)
        self._logits: Any = None

    def start(self) -> None:
        """Start (or restart) the clock now, with no evaluation, step or target yet."""
        super().start()
        self.steps, self.best, self.time_to_target = 0, 0.0, None
        self.curve = []

    def accuracy(self) -> float:
        """Test accuracy of the model being trained (called only while the clock is paused)."""
        if self._logits is None:
            model = self.model
            self._logits = tf.function(lambda x: model(x, training=False))
        logits = self._logits(self.x_test)
        hits = tf.equal(tf.argmax(logits, axis=-1), self.y_test)
        return float(tf.reduce_mean(tf.cast(hits, tf.float32)))

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        """Every ``eval_every`` steps: pause, evaluate on rank 0, share the decision, resume."""
        self.steps += 1
        if self.steps % self.eval_every:
            return
        self.comm.barrier(name="dho2/bench/pause")
        with self.paused() as elapsed:
            decision = None
            if self.comm.is_root:
                acc = self.accuracy()
                self.best = max(self.best, acc)
                self.curve.append((elapsed, acc))
                decision = (self.target_met(accuracy=acc), elapsed > self.budget_s, elapsed,
                            self.best)
            reached, over, elapsed, self.best = self.comm.broadcast_object(
                decision, name="dho2/bench/decision")
            if reached:
                self.reach(elapsed)
            if reached or over:
                self.model.stop_training = True


def _reset(model: tf.keras.Model, weights: list[np.ndarray],
           optimizer: tf.keras.optimizers.Optimizer) -> None:
    """Initial weights back, optimizer state (slots and iteration count) zeroed."""
    model.set_weights(weights)
    for v in optimizer.variables:
        v.assign(tf.zeros_like(v))


def _shard(data: Any, comm: Communicator) -> tuple[np.ndarray, np.ndarray]:
    """Rank r's fixed shard of ⌊n/P⌋ training examples, as ``jobs/train.py --prioritized``
    takes it (:func:`dho2_tf.training.data.shard_arrays`, seed 0; one rank: every row)."""
    return shard_arrays(data.x_train, data.y_train, comm, drop_remainder=True, seed=0)


def _train_sgd(spec: RunSpec, model: tf.keras.Model, x_r: np.ndarray, y_r: np.ndarray,
               clock: TargetClock, comm: Communicator
               ) -> tuple[float, int, np.ndarray, np.ndarray]:
    """Warm up, reset, then the timed mini-batch SGD run; returns (init seconds, evaluations,
    [light, full] step seconds, [light, full] step counts) (every SGD step counts as light)."""
    weights = model.get_weights()
    local_batch = max(1, spec.batch // comm.size)
    dataset = (tf.data.Dataset.from_tensor_slices((x_r, y_r))
               .shuffle(len(y_r), seed=spec.seed, reshuffle_each_iteration=True)
               .batch(local_batch, drop_remainder=True).repeat())
    trainer = DataParallelModel(model, comm)
    trainer.compile(optimizer=_optimizer(spec), loss=LOSS)
    trainer.fit(dataset, steps_per_epoch=1, verbose=0)  # warm-up: traces the step
    _reset(model, weights, trainer.optimizer)
    trainer.step_seconds.assign(0.0)
    trainer.step_count.assign(0.0)
    clock.start()
    trainer.fit(dataset, epochs=MAX_EPOCHS, steps_per_epoch=max(1, len(y_r) // local_batch),
                verbose=0, callbacks=[clock])
    return (0.0, clock.steps * local_batch * comm.size,
            np.array([trainer.step_seconds.numpy(), 0.0]),
            np.array([trainer.step_count.numpy(), 0.0]))


def _train_psgd(spec: RunSpec, model: tf.keras.Model, x_r: np.ndarray, y_r: np.ndarray,
                clock: TargetClock, comm: Communicator
                ) -> tuple[float, int, np.ndarray, np.ndarray]:
    """Warm up, reset, then the timed PSGD run (initial pass on the clock); returns as
    :func:`_train_sgd`, with the sampler's light and full steps."""
    weights = model.get_weights()
    sampler = PrioritizedSampler(spec.k, spec.r, seed=spec.seed, **PSGD_VARIANTS[spec.method])
    trainer = PrioritizedModel(model, sampler, comm=comm)
    trainer.compile(optimizer=_optimizer(spec), loss=LOSS)
    trainer.fit(x_r, y_r, steps_per_epoch=1, verbose=0)  # warm-up: traces pass and step
    _reset(model, weights, trainer.optimizer)
    clock.start()
    sampler.initialize()
    init_seconds = clock.elapsed()
    trainer.fit(epochs=MAX_EPOCHS, verbose=0, callbacks=[clock])
    evaluations = comm.allreduce(tf.cast(sampler.evaluations, tf.float32), "sum",
                                 name="dho2/bench/evaluations")
    return (init_seconds, int(evaluations), sampler.step_seconds.numpy(),
            sampler.step_counts.numpy())


def _optimizer(spec: RunSpec) -> tf.keras.optimizers.Optimizer:
    return tf.keras.optimizers.SGD(spec.learning_rate, momentum=0.9)


def mean_step_ms(seconds: np.ndarray, counts: np.ndarray, comm: Communicator) -> list[float]:
    """Mean in-graph milliseconds of the [light, full] steps, averaged over ranks (0 if none)."""
    local = 1e3 * np.divide(seconds, counts, out=np.zeros(2), where=counts > 0)
    mean = comm.allreduce(tf.constant(local, tf.float64), "mean", name="dho2/bench/step_ms")
    return [float(v) for v in np.asarray(mean)]


def run_once(spec: RunSpec, data: Any, target: float, budget_s: float, eval_every: int,
             comm: Communicator, record_curve: bool = False) -> RunResult:
    """Train ``spec`` on this rank's fixed shard of ``data`` until target or budget.

    Args:
        spec: the run.
        data: a :class:`dho2_tf.training.data.Dataset` (identical on every rank).
        target: test accuracy to reach.
        budget_s: clock budget in seconds.
        eval_every: steps between test evaluations.
        comm: communicator.
        record_curve: keep rank 0's (clock seconds, test accuracy) of every evaluation.

    Returns:
        The :class:`RunResult` (identical on every rank, except ``curve``: rank 0's).
    """
    x_r, y_r = _shard(data, comm)
    model = build_model(spec.model, tuple(data.input_shape), data.num_classes, spec.seed)
    clock = TargetClock(data.x_test, data.y_test, target, budget_s, eval_every, comm)
    train = _train_sgd if spec.method == "sgd" else _train_psgd
    init_seconds, evaluations, seconds, counts = train(spec, model, x_r, y_r, clock, comm)
    init_seconds = comm.broadcast_object(init_seconds, name="dho2/bench/init_seconds")
    light_ms, full_ms = mean_step_ms(seconds, counts, comm)
    return RunResult(spec, comm.size, clock.time_to_target, init_seconds, clock.steps,
                     evaluations, clock.best, len(y_r) * comm.size, int(counts[0]),
                     int(counts[1]), light_ms, full_ms, float(budget_s),
                     clock.curve if record_curve else [])


def calibrated_target(curve: list[tuple[float, float]], min_seconds: float) -> float | None:
    """The lowest test accuracy whose first crossing in ``curve`` is at ≥ ``min_seconds``.

    That is the smallest accuracy in the curve above the best one seen before ``min_seconds``;
    ``None`` if the curve never improves after ``min_seconds`` (the run cannot be made that
    long by a tighter target).

    Args:
        curve: ``(clock seconds, test accuracy)`` in time order.
        min_seconds: the wanted minimum time to target.
    """
    before = max((acc for t, acc in curve if t < min_seconds), default=0.0)
    later = [acc for t, acc in curve if t >= min_seconds and acc > before]
    return min(later) if later else None


def equal_work_batch(k: float, r: float, n: int, ranks: int) -> int:
    """Global SGD batch with PSGD's per-step work: P·(⌊k·n_j⌋ + ⌊r·n_j⌋), n_j = n/P."""
    n_local = n // ranks
    return ranks * (math.floor(k * n_local) + math.floor(r * n_local))
