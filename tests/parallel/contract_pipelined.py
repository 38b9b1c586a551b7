"""Run under ``horovodrun -np 3``: the Keras optimizer contract for DHO2 ``mode="pipelined"``.

Ranks 0 and 1 train (the update set U, state sharded over both), rank 2 computes curvature (C).
The checks are those of ``tests/unit/optimizer/test_contract.py`` for the other modes, with the
same data, model and expected values: iteration counter and ``None`` gradients, ``clipnorm`` /
``clipvalue`` / ``global_clipnorm`` and learning-rate schedules against Keras SGD, constraints,
a ``tf.train.Checkpoint`` round trip and ``set_weights`` after pipelined refreshes (the restored
optimizer must continue exactly as the original), and the config round trip.

Both update ranks use the same batches, so the gradient DHO2 averages over U is the gradient of
that batch. Every optimizer on U trains in sessions (steps, then ``on_train_end``); C serves each
session with a curvature-side optimizer of the same configuration, in the same order. Every
rank prints ``CONTRACT <check> OK`` or ``CONTRACT <check> FAIL <reason>``; the run always
finishes all sessions, so a failing check never leaves a rank waiting in a collective.
"""

from __future__ import annotations

import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from dho2_tf import DHO2, HorovodComm
from dho2_tf.distributed.pipeline import pipeline_process_sets
from tests.unit.optimizer import test_contract as contract
from tests.unit.optimizer.test_contract import CURVATURE, LOSS, data, model_of, train, weights

CURVATURE_RANKS = 1


class Pipeline:
    """The optimizers of one check, and the order in which their sessions run.

    On U, :meth:`session` runs ``steps(opt, model)`` then ``opt.on_train_end()``. On C it
    serves that session with the curvature-side twin of ``name`` (created and bound on first
    use, with the same keyword arguments), so C sees the sessions in U's order.
    """

    def __init__(self, comm: HorovodComm, x: np.ndarray, y: np.ndarray) -> None:
        self.comm, self.x, self.y = comm, x, y
        self.optimizers: dict[str, tuple[DHO2, tf.keras.Model]] = {}
        self.served: list[list[dict[str, Any]]] = []
        self.error: BaseException | None = None

    def make(self, name: str, model: tf.keras.Model | None = None, **kw: Any) -> DHO2:
        params = dict(learning_rate=0.1, base="sgd", k=2, refresh_every=100, mode="pipelined",
                      curvature_ranks=CURVATURE_RANKS, comm=self.comm)
        params.update(kw)
        opt = DHO2(**params)
        model = model_of() if model is None else model
        opt.bind(model, LOSS, (self.x[:32], self.y[:32]))   # C's curvature batch
        self.optimizers[name] = (opt, model)
        return opt

    def session(self, name: str, steps: Callable[[DHO2, tf.keras.Model], None]) -> None:
        """One session; after a failed one, later sessions only release C (see :meth:`done`)."""
        opt, model = self.optimizers[name]
        if opt.is_curvature_rank:
            self.served.append(opt.serve_curvature())
            return
        try:
            if self.error is None:
                steps(opt, model)
        except Exception as err:  # noqa: BLE001 -- raised again by done()
            self.error = err
        finally:
            opt.on_train_end()          # C's serve_curvature() returns either way

    def done(self) -> None:
        """Raise the first failure of a session (after every session has run)."""
        if self.error is not None:
            raise self.error


def close(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    for u, v in zip(a, b, strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)


def check_iterations_and_none_gradients(comm: HorovodComm) -> None:
    x, y = data()
    pipe = Pipeline(comm, x, y)
    pipe.make("opt")
    pipe.session("opt", lambda opt, model: contract.check_iterations_and_none_gradients(
        opt, model, x, y))
    pipe.done()


def check_gradient_clipping(comm: HorovodComm) -> None:
    x, y = data()
    for clip in contract.CLIPS:
        pipe = Pipeline(comm, x, y)
        pipe.make("opt", **clip)
        pipe.session("opt", lambda opt, model: contract.check_gradient_clipping(
            opt, model, x, y, clip))
        pipe.done()


def check_learning_rate_schedule(comm: HorovodComm) -> None:
    x, y = data()
    pipe = Pipeline(comm, x, y)
    pipe.make("opt", learning_rate=contract.SCHEDULE)
    pipe.session("opt", lambda opt, model: contract.check_learning_rate_schedule(
        opt, model, x, y))
    pipe.done()


def check_constraints(comm: HorovodComm) -> None:
    x, y = data()
    y = -y                                                 # drives the output kernel negative
    pipe = Pipeline(comm, x, y)
    pipe.make("opt", model_of(kernel_constraint=tf.keras.constraints.NonNeg()), learning_rate=0.5)
    pipe.session("opt", lambda opt, model: contract.check_constraints(opt, model, x, y))
    pipe.done()


# Triggers before steps 1, 4, 7, 10, ...; each DELIVERed Δ = 2 steps later. After 7 steps the
# second refresh is installed and none is in flight, so a checkpoint holds the whole state.
FIRST, SECOND = 7, 3   # the SECOND steps 7-9 trigger refresh 2 and install it


def check_checkpoint_round_trip(comm: HorovodComm) -> None:
    """A checkpoint after two pipelined refreshes restores every optimizer variable; the
    restored optimizer then refreshes and trains exactly as the original."""
    x, y = data()
    pipe = Pipeline(comm, x, y)
    opt = pipe.make("original", **CURVATURE)
    folder = tempfile.TemporaryDirectory(prefix=f"dho2-contract-{comm.rank}-")
    saved: dict[str, str] = {}

    def first(opt: DHO2, model: tf.keras.Model) -> None:
        train(opt, model, x, y, FIRST)
        assert opt.refresh_index() == 2, opt.refresh_index()
        saved["path"] = tf.train.Checkpoint(model=model, optimizer=opt).save(
            str(Path(folder.name) / "ckpt"))

    def resumed(restored: DHO2, restored_model: tf.keras.Model) -> None:
        tf.train.Checkpoint(model=restored_model, optimizer=restored).restore(saved["path"])
        restored.sync_host_state()
        original = pipe.optimizers["original"][0]
        assert [v.name for v in restored.variables] == [v.name for v in original.variables]
        for a, b in zip(restored.variables, original.variables):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
        train(restored, restored_model, x, y, SECOND)
        assert restored.refresh_index() == 3 and restored.triggers == [FIRST]

    def second(opt: DHO2, model: tf.keras.Model) -> None:
        train(opt, model, x, y, SECOND)
        assert opt.refresh_index() == 3 and opt.triggers == [1, 4, FIRST]
        close(weights(pipe.optimizers["restored"][1]), weights(model))

    pipe.session("original", first)
    pipe.make("restored", model_of(seed=1), **CURVATURE)
    pipe.session("restored", resumed)
    pipe.session("original", second)
    folder.cleanup()
    pipe.done()
    if opt.is_curvature_rank:   # C served refreshes 0, 1, then 2 for each of the two runs
        assert [[r["refresh"] for r in s] for s in pipe.served] == [[0, 1], [2], [2]], pipe.served


def check_set_weights_round_trip(comm: HorovodComm) -> None:
    """set_weights([v.numpy() for v in opt.variables]) on another optimizer that trained on its
    own makes it continue exactly as the original."""
    x, y = data()
    pipe = Pipeline(comm, x, y)
    pipe.make("original", **CURVATURE)
    pipe.make("other", **CURVATURE)

    def copy_into_other(other: DHO2, other_model: tf.keras.Model) -> None:
        train(other, other_model, x[::-1], y[::-1], FIRST)   # other state, same refresh count
        opt, model = pipe.optimizers["original"]
        other.set_weights([v.numpy() for v in opt.variables])
        other_model.set_weights(model.get_weights())
        for a, b in zip(other.variables, opt.variables):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
        assert other.refresh_index() == 2

    def second(opt: DHO2, model: tf.keras.Model) -> None:
        train(opt, model, x, y, SECOND)

    def compare(other: DHO2, other_model: tf.keras.Model) -> None:
        train(other, other_model, x, y, SECOND)
        close(weights(other_model), weights(pipe.optimizers["original"][1]))

    pipe.session("original", lambda opt, model: train(opt, model, x, y, FIRST))
    pipe.session("other", copy_into_other)
    pipe.session("original", second)
    pipe.session("other", compare)
    pipe.done()


def check_config_round_trip(comm: HorovodComm) -> None:
    for lr in (0.05, tf.keras.optimizers.schedules.CosineDecay(0.1, decay_steps=50)):
        opt = DHO2(learning_rate=lr, clipnorm=1.5, max_consecutive_skips=9, k=3, ell=1,
                   mode="pipelined", curvature_ranks=CURVATURE_RANKS, delivery_delay=3,
                   comm=comm)
        clone = contract.check_config_round_trip(opt)
        assert (clone.mode, clone.curvature_ranks, clone.delivery_delay) == ("pipelined", 1, 3)
        assert clone.clipnorm == 1.5 and clone.max_consecutive_skips == 9


CHECKS = {
    "iterations_and_none_gradients": check_iterations_and_none_gradients,
    "gradient_clipping": check_gradient_clipping,
    "learning_rate_schedule": check_learning_rate_schedule,
    "constraints": check_constraints,
    "checkpoint_round_trip": check_checkpoint_round_trip,
    "set_weights_round_trip": check_set_weights_round_trip,
    "config_round_trip": check_config_round_trip,
}


def run_checks(comm: HorovodComm, selected: list[str]) -> list[str]:
    """Run the ``selected`` checks in order; each prints ``CONTRACT <check> OK`` or ``CONTRACT
    <check> FAIL <reason>`` on this rank and ends at a barrier. The names of the failed ones."""
    failed = []
    for name in selected:
        check = CHECKS[name]
        try:
            check(comm)
            status = "OK"
        except Exception as err:  # noqa: BLE001 -- reported per check, the run goes on
            status = f"FAIL {type(err).__name__}: {err}"
            failed.append(name)
            traceback.print_exc()
        print(f"CONTRACT {name} {status}".replace("\n", " | "), flush=True)
        comm.barrier(f"test/contract/{name}")
    return failed


def main() -> None:
    comm = HorovodComm(process_sets=pipeline_process_sets(CURVATURE_RANKS))
    assert comm.size == 3, "run with horovodrun -np 3"
    run_checks(comm, sys.argv[1:] or list(CHECKS))   # e.g. contract_pipelined.py constraints
    sys.exit(0)


if __name__ == "__main__":
    main()
