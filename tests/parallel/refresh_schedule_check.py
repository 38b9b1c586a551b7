"""Under horovodrun: the adaptive refresh schedule takes the same decisions and issues the same
collectives on every rank, in every mode that accepts it, with warm-started refreshes.

Run: ``horovodrun --gloo -np P -H localhost:P python tests/parallel/refresh_schedule_check.py``.
Every rank trains on its own rows and binds its own curvature batch (so the ranks' Hessians
differ); DHO2 runs with ``max_refresh_every`` and a tolerance at which some checks refresh and
some stretch the interval. Per mode the script records on every rank each staleness check (step,
staleness, decision), the steps and methods of the refreshes and every collective call
(:class:`dho2_tf.distributed.comm.CountingComm`, in call order), then compares them across ranks
and with the schedule's rule (refresh iff staleness > tolerance, or the maximum interval
reached). A ``request_refresh`` at a fixed step must refresh on every rank before the next
update. Rank 0 prints ``refresh_schedule_check OK`` at the end; any failure exits non-zero.
"""

from __future__ import annotations

import sys

import numpy as np
import tensorflow as tf

from dho2_tf import DHO2, CurvatureRefresh, HorovodComm
from dho2_tf.distributed.comm import CountingComm

D, C, B, ROWS = 10, 4, 16, 512
LOSS = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
MODES = ("sharded", "replicated", "faithful", "admm")
EVERY, MAX_EVERY, REQUEST_AT = 3, 12, 20
#: Tolerances at which the checks both refresh and stretch (ADMM's consensus z moves in jumps).
TOLS = {"sharded": 0.03, "replicated": 0.03, "faithful": 0.03, "admm": 0.03}
OK_LINE = "refresh_schedule_check OK"


def rank_rows(rank: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(100 + rank)
    return (rng.standard_normal((ROWS, D)).astype("float32"),
            rng.integers(0, C, ROWS).astype("int32"))


class Recorder(tf.keras.callbacks.Callback):
    """Staleness decisions (from the schedule) and refreshes (from ``last_refresh``)."""

    def __init__(self, opt: DHO2) -> None:
        super().__init__()
        self.opt, self.decisions, self.refreshes, self.step = opt, [], [], 0
        schedule = opt.curvature.schedule
        original = schedule.due

        def due(t, count, check):
            before = schedule.checks
            result = original(t, count, check)
            if schedule.checks != before:
                self.decisions.append((t, schedule.staleness, bool(result)))
            return result

        schedule.due = due

    def on_train_batch_begin(self, batch, logs=None):
        last = self.opt.last_refresh
        if last is not None and (not self.refreshes or self.refreshes[-1][0] != last["index"]):
            self.refreshes.append((last["index"], self.step, last["method"],
                                   bool(last["installed"])))

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step == REQUEST_AT:
            self.opt.request_refresh("test: guard at step %d" % REQUEST_AT)


def run_mode(comm: CountingComm, mode: str) -> dict:
    opt = DHO2(learning_rate=0.01, alpha=0.01, base="momentum", k=3, ell=1, refresh_every=EVERY, warmup=2,
               max_refresh_every=MAX_EVERY, staleness_tol=TOLS[mode], mode=mode, comm=comm, tau=4)
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([tf.keras.Input((D,)), tf.keras.layers.Dense(16, "tanh"),
                                 tf.keras.layers.Dense(C)])
    model.compile(optimizer=opt, loss=LOSS)
    x, y = rank_rows(comm.rank)
    recorder = Recorder(opt)
    start = len(comm.calls)
    model.fit(x, y, batch_size=B, epochs=2, shuffle=False, verbose=0,
              callbacks=[CurvatureRefresh(batch=(x[:64], y[:64])), recorder])
    calls = [(kind, name) for kind, name, _ in comm.calls[start:]]
    return {"decisions": recorder.decisions, "refreshes": recorder.refreshes, "calls": calls,
            # Times are per rank, and so is the step guard's gradient average in admm (each
            # rank steps on its own gradient between consensus rounds).
            "metrics": {k: v for k, v in opt.curvature_metrics().items()
                        if not k.endswith("seconds")
                        and not (mode == "admm" and k.startswith("guard_"))}}


def rule_failures(mode: str, result: dict) -> list[str]:
    """The schedule's rule, checked on this rank's record."""
    failures = []
    decisions = result["decisions"]
    for t, staleness, refreshed in decisions:
        if refreshed != (not staleness <= TOLS[mode]):
            failures.append(f"{mode}: step {t} staleness {staleness} decided {refreshed}")
    if not any(r for _, _, r in decisions) or all(r for _, _, r in decisions):
        failures.append(f"{mode}: checks did not both refresh and stretch: {decisions}")
    steps = [step for _, step, _, _ in result["refreshes"]]
    if any(b - a > MAX_EVERY for a, b in zip(steps, steps[1:])):
        failures.append(f"{mode}: an interval exceeds max_refresh_every: {steps}")
    if REQUEST_AT not in steps:
        failures.append(f"{mode}: the requested refresh did not run at step {REQUEST_AT}: "
                        f"{steps}")
    methods = [method for _, _, method, _ in result["refreshes"]]
    if methods[:1] != ["lanczos"] or any(m != "warm" for m in methods[1:]):
        failures.append(f"{mode}: refresh methods {methods}")
    return failures


def main() -> int:
    comm = CountingComm(HorovodComm())
    if comm.size < 2:
        raise RuntimeError("Run under horovodrun with -np 2 or more.")
    failures = []
    for mode in MODES:
        result = run_mode(comm, mode)
        failures += rule_failures(mode, result)
        every = comm.allgather_object(result, name=f"dho2/test/schedule/{mode}")
        for rank, other in enumerate(every):
            for key in ("decisions", "refreshes", "calls", "metrics"):
                if other[key] != result[key]:
                    failures.append(f"{mode}: rank {rank} differs from rank {comm.rank} in "
                                    f"{key}")
    every_failure = [f for rank_failures in comm.allgather_object(
        failures, name="dho2/test/schedule/failures") for f in rank_failures]
    if every_failure:
        raise AssertionError("refresh_schedule_check failed:\n" + "\n".join(every_failure))
    if comm.rank == 0:
        print(f"{OK_LINE} (P={comm.size}, modes {', '.join(MODES)})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
