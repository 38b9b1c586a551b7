"""The time-to-target clock (``dho2_tf.clock``): evaluations stay off it, a target stops ``fit``
at the epoch (or evaluation) that meets it, and the benchmarks' clock is the same clock.

Time comes from an injected fake timer: every training step advances it by one second and
every evaluation by a hundred, so each clock reading is known exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from benchmarks.prioritized.harness import TargetClock
from dho2_tf.callbacks import TestAccuracyClock as ReExported
from dho2_tf.clock import TestAccuracyClock, TimeToTargetClock
from dho2_tf.distributed.comm import LocalComm

STEP_SECONDS, EVALUATION_SECONDS = 1.0, 100.0
ROWS, BATCH = 64, 16  # 4 steps per epoch
EPOCHS = 6


class FakeTime:
    """The timer the clock reads, and a callback advancing it by one second per step."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.steps = tf.keras.callbacks.LambdaCallback(on_train_batch_end=self.tick)

    def __call__(self) -> float:
        return self.now

    def tick(self, *args) -> None:
        self.now += STEP_SECONDS


class CostlyEvaluation(TestAccuracyClock):
    __test__ = False

    def __init__(self, fake: FakeTime, *args, **kwargs) -> None:
        super().__init__(*args, timer=fake, **kwargs)
        self.fake, self.evaluations = fake, 0

    def _evaluate(self, x, y):
        self.fake.now += EVALUATION_SECONDS
        self.evaluations += 1
        return super()._evaluate(x, y)


def problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(ROWS + 200, 4)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5, 1.5]) > 0).astype(np.int32)
    return x[:ROWS], y[:ROWS], x[ROWS:], y[ROWS:]


def model() -> tf.keras.Model:
    tf.keras.utils.set_random_seed(3)
    net = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(2)])
    net.compile(optimizer=tf.keras.optimizers.SGD(0.05),
                loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"])
    return net


def first_crossing(values, better) -> tuple[int, float]:
    """(index, value) of an entry that beats every earlier one, away from both ends."""
    for i in range(2, len(values) - 1):
        if all(better(values[i], v) for v in values[:i]):
            return i, values[i]
    raise AssertionError(f"no improvement to target in {values}")


def run(epochs: int = EPOCHS, **targets) -> CostlyEvaluation:
    """``fit`` with a clock whose evaluations cost time; one step per fake second."""
    x, y, x_test, y_test = problem()
    fake = FakeTime()
    clock = CostlyEvaluation(fake, x_test, y_test, train_data=(x, y), **targets)
    model().fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0,
                callbacks=[fake.steps, clock])
    return clock


@pytest.fixture(scope="module")
def free() -> CostlyEvaluation:
    """No target: the whole trajectory, from the same initial weights as every other run."""
    return run()


def test_the_callbacks_module_re_exports_the_clock():
    assert ReExported is TestAccuracyClock and issubclass(TestAccuracyClock, TimeToTargetClock)


@pytest.mark.parametrize("kind", ["accuracy", "loss"])
def test_fit_stops_at_the_epoch_that_meets_the_target_and_evaluations_are_off_the_clock(
        kind, free):
    assert len(free.history) == EPOCHS and free.time_to_target is None
    steps = ROWS // BATCH
    assert [row["seconds"] for row in free.history] == [steps * e for e in range(1, EPOCHS + 1)]
    if kind == "accuracy":
        index, target = first_crossing([r["test_accuracy"] for r in free.history],
                                       lambda a, b: a > b)
        clock = run(target_accuracy=target)
    else:
        index, target = first_crossing([r["train_loss"] for r in free.history],
                                       lambda a, b: a < b)
        clock = run(target_loss=target)
    assert len(clock.history) == index + 1  # stopped at the first epoch that met it
    assert clock.history == free.history[:index + 1]
    assert clock.time_to_target == steps * (index + 1) * STEP_SECONDS
    # the evaluations (two per epoch: test set and training set) cost time, the clock none
    assert clock.evaluations == 2 * (index + 1)
    assert clock.fake.now == 1000.0 + clock.time_to_target + clock.evaluations * EVALUATION_SECONDS


def test_the_clock_starts_at_the_optimizers_compile_time():
    x, y, x_test, y_test = problem()
    fake = FakeTime()
    clock = CostlyEvaluation(fake, x_test, y_test)
    net = model()
    net.optimizer.compile_seconds = 7.5  # as DHO2 reports its tracing when bound
    net.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0,
            callbacks=[fake.steps, clock])
    assert [row["seconds"] for row in clock.history] == [11.5, 15.5]


def test_paused_reading_and_target_checks():
    fake = FakeTime()
    clock = TimeToTargetClock(target_accuracy=0.5, timer=fake)
    clock.start(2.0)
    fake.now += 3.0
    with clock.paused() as reading:
        fake.now += 50.0
        assert reading == 5.0 and clock.elapsed() == 55.0  # inside: the pause is not over
    fake.now += 1.0
    assert clock.elapsed() == 6.0
    assert clock.target_met(accuracy=0.5) and not clock.target_met(accuracy=0.49)
    assert not clock.target_met(accuracy=float("nan"), loss=0.0)
    assert TimeToTargetClock(target_loss=0.1).target_met(loss=0.1)
    assert not TimeToTargetClock().target_met(accuracy=1.0, loss=0.0)
    with pytest.raises(ValueError, match="`timer` must be callable"):
        TimeToTargetClock(timer=3.0)


class SlowTargetClock(TargetClock):
    """The benchmarks' clock with a costly evaluation (a hundred fake seconds)."""

    def __init__(self, fake: FakeTime, *args) -> None:
        super().__init__(*args, LocalComm(), timer=fake)
        self.fake = fake

    def accuracy(self) -> float:
        self.fake.now += EVALUATION_SECONDS
        return super().accuracy()


def bench_fit(target: float, budget: float, epochs: int = EPOCHS) -> SlowTargetClock:
    x, y, x_test, y_test = problem()
    fake = FakeTime()
    clock = SlowTargetClock(fake, x_test, y_test, target, budget, 3)
    net = model()
    clock.start()
    net.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0,
            callbacks=[fake.steps, clock])
    return clock


def test_the_benchmark_clock_stops_at_the_evaluation_that_meets_the_target_or_the_budget():
    free = bench_fit(1.0, budget=1e9)  # the linear model never fits every test row
    accuracies = [acc for _, acc in free.curve]
    assert [t for t, _ in free.curve] == [3.0 * i for i in range(1, 9)]  # 24 steps, every 3rd
    assert free.time_to_target is None and free.best == max(accuracies)
    index, target = first_crossing(accuracies, lambda a, b: a > b)
    clock = bench_fit(target, budget=1e9)
    assert clock.curve == free.curve[:index + 1] and clock.steps == 3 * (index + 1)
    assert clock.time_to_target == 3.0 * (index + 1)
    over = bench_fit(1.0, budget=7.0)  # evaluations at 3, 6, 9 s: the third is over budget
    assert over.steps == 9 and over.time_to_target is None and len(over.curve) == 3
