"""The scaling benchmark's worker: every mode on this rank, what runs under ``horovodrun``.

The driver (``benchmarks/bench_scaling.py``) starts it once per P with ``--worker-json``:
P = 1 as a plain process with ``LocalComm``, P > 1 under ``horovodrun --gloo``. The worker
runs every mode in one process with one ``HorovodComm`` (the process sets of ``pipelined`` with
P_C = P//2 registered up front), each mode through its own ``CountingComm``, and rank 0 writes
the per-rank records of every mode to the worker JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from benchmarks.common import share_cores_between_ranks
from benchmarks.scaling.cost_model import ring_bytes
from dho2_tf.distributed.comm import CountingComm
from dho2_tf.modes import mode_class

RUN_ORDER = ("sharded", "faithful", "admm", "pipelined")    # pipelined last: Δ from sharded
HIDDEN = (512, 200)
QUICK = {"refresh_every": 4, "tau": 4, "delivery_delay": "3", "warm_steps": 1,
         "num_samples": 1000}
logger = logging.getLogger("bench_scaling")


def summarize(records: list[tuple[str, str, int, int]], per: float = 1.0) -> dict[str, Any]:
    """Payload bytes, count and ring estimate of ``records``, divided by ``per``."""
    by_kind: dict[str, list[float]] = {}
    for kind, _, nbytes, _ in records:
        entry = by_kind.setdefault(kind, [0.0, 0.0])
        entry[0] += 1 / per
        entry[1] += nbytes / per
    return {"payload": sum(r[2] for r in records) / per, "count": len(records) / per,
            "ring": sum(ring_bytes(r[0], r[2], r[3]) for r in records) / per,
            "by_kind": {k: {"count": v[0], "payload": v[1]} for k, v in sorted(by_kind.items())}}


def add_summaries(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Sum of two :func:`summarize` results."""
    kinds = sorted(set(a["by_kind"]) | set(b["by_kind"]))
    zero = {"count": 0.0, "payload": 0.0}
    return {"payload": a["payload"] + b["payload"], "count": a["count"] + b["count"],
            "ring": a["ring"] + b["ring"],
            "by_kind": {k: {f: a["by_kind"].get(k, zero)[f] + b["by_kind"].get(k, zero)[f]
                            for f in ("count", "payload")} for k in kinds}}


def mean(values: list[float]) -> float | None:
    """Arithmetic mean, ``None`` for an empty list."""
    return sum(values) / len(values) if values else None


class ModeRun:
    """One mode on this rank: model, optimizer, traced step and the eager timing loop."""

    def __init__(self, mode: str, comm: Any, data: Any, args: argparse.Namespace,
                 delay: int) -> None:
        import tensorflow as tf

        from dho2_tf import DHO2

        self.tf, self.mode, self.args = tf, mode, args
        self.counting = CountingComm(comm)
        tf.keras.utils.set_random_seed(0)
        self.model = tf.keras.Sequential(
            [tf.keras.Input((40,))] + [tf.keras.layers.Dense(h, activation="relu")
                                       for h in HIDDEN] + [tf.keras.layers.Dense(10)])
        self.loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        pipelined = not mode_class(mode).all_ranks_train   # a curvature set of its own
        refresh_every = 2 * delay if pipelined else args.refresh_every
        self.opt = DHO2(learning_rate=1e-3, base="adam", k=args.k, lanczos_order=args.m,
                        refresh_every=refresh_every, warmup=1, mode=mode, tau=args.tau,
                        curvature_ranks=max(1, comm.size // 2), delivery_delay=delay,
                        comm=self.counting)
        self.delay = delay
        x, y = data.x_train[comm.rank::comm.size], data.y_train[comm.rank::comm.size]
        b = args.batch_size
        self.batches = [(tf.constant(x[i:i + b]), tf.constant(y[i:i + b]))
                        for i in range(0, len(x) - b + 1, b)]
        c = args.curvature_batch
        self.opt.bind(self.model, self.loss, (x[:c], y[:c]))

    def record(self) -> dict[str, Any]:
        """Run the mode on this rank; returns its measurements."""
        base = {"mode": self.mode, "rank": self.counting.rank, "n": self.opt.spec.n,
                "state_bytes": self.opt.state_bytes(),
                "shard_size": self.opt.layout.shard_size}
        if self.opt.is_curvature_rank:
            return {**base, "role": "C", **self.serve()}
        role = "all" if mode_class(self.mode).all_ranks_train else "U"
        return {**base, "role": role, **self.train()}

    def traced_step(self) -> tuple[Any, list[tuple[str, str, int, int]]]:
        """The ``tf.function`` train step and the collectives of its (single) trace."""
        tf, model, opt = self.tf, self.model, self.opt

        @tf.function
        def train_step(x: Any, y: Any) -> Any:
            with tf.GradientTape() as tape:
                loss = self.loss(y, model(x, training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        self.counting.reset()
        train_step.get_concrete_function(*self.batches[0])
        return train_step, self.counting.records()

    def schedule(self) -> tuple[int, list[tuple[int, int]]]:
        """Number of steps and the refresh windows [first, last] (inclusive; the first, with
        tracing, is not timed). Steps are a multiple of τ, so ADMM rounds amortise exactly."""
        if not mode_class(self.mode).all_ranks_train:
            d = self.delay                  # triggers at 0, 2Δ, 4Δ; deliveries Δ later
            return 6 * d, [(0, d), (2 * d, 3 * d), (4 * d, 5 * d)]
        r = self.args.refresh_every         # refreshes before steps 0, R, 2R
        return 3 * r, [(0, 0), (r, r), (2 * r, 2 * r)]

    def train(self) -> dict[str, Any]:
        """Training ranks: the eager loop with per-phase timing and collective records."""
        self.opt.verify_consistency(self.model)     # as CurvatureRefresh (C: serve_curvature)
        train_step, graph_calls = self.traced_step()
        steps, windows = self.schedule()
        pipelined = not mode_class(self.mode).all_ranks_train
        warm = max(self.args.warm_steps, windows[0][1] + 1)
        starts, ends = {a for a, _ in windows}, {b for _, b in windows}
        in_window = {t for a, b in windows for t in range(a, b + 1)}
        step_times, window_times, waits, window_start = [], [], [], 0.0
        step_calls, refresh_calls = [], []
        self.counting.reset()
        for t in range(steps):
            x, y = self.batches[t % len(self.batches)]
            mark, t0 = len(self.counting.calls), time.perf_counter()
            self.opt.on_step_begin()
            t1 = time.perf_counter()
            hook_calls = self.counting.records(mark)
            train_step(x, y).numpy()
            mark = len(self.counting.calls)
            self.opt.on_step_end()
            t2 = time.perf_counter()
            step_calls += self.counting.records(mark)
            if t not in in_window:
                step_calls += hook_calls
                if t >= warm:
                    step_times.append(t2 - t0)
            elif t >= warm:
                refresh_calls += hook_calls
                window_start = t0 if t in starts else window_start
                if t in ends:
                    window_times.append(t1 - window_start)
                    waits.append(t1 - t0)
        self.opt.on_train_end()
        if train_step.experimental_get_tracing_count() != 1:
            raise RuntimeError("the train step was traced more than once; per-step collective "
                               "counts would be wrong")
        return {"step_seconds": mean(step_times), "steps_timed": len(step_times),
                "refresh_seconds": None if pipelined else mean(window_times),
                "window_step_seconds": mean(window_times) / self.delay if pipelined else None,
                "deliver_wait_seconds": mean(waits) if pipelined else None,
                "delay": self.delay if pipelined else None,
                "lanczos_seconds": (self.opt.last_refresh or {}).get("seconds"),
                "step": add_summaries(summarize(graph_calls), summarize(step_calls, per=steps)),
                "refresh": summarize(refresh_calls, per=len(windows) - 1)}

    def serve(self) -> dict[str, Any]:
        """Pipelined curvature ranks: serve refreshes; the last call is the stop broadcast."""
        self.counting.reset()
        served = self.opt.serve_curvature()
        calls = self.counting.records()[:-1]
        return {"refresh_seconds": mean([s["seconds"] for s in served[1:]]),
                "served": len(served), "step_seconds": None,
                "step": summarize([]), "refresh": summarize(calls, per=len(served))}


def auto_delay(sharded: list[dict[str, Any]], args: argparse.Namespace) -> int:
    """Δ for ``pipelined``: ⌈1.1·T_refresh/t_step⌉ of the sharded run, clipped."""
    if args.delivery_delay != "auto":
        return int(args.delivery_delay)
    refresh = max(r["refresh_seconds"] for r in sharded)
    step = max(r["step_seconds"] for r in sharded)
    return int(min(args.max_delay, max(4, math.ceil(1.1 * refresh / step))))


def run(args: argparse.Namespace) -> None:
    """Runs on every rank (under horovodrun for P > 1): all modes; rank 0 writes the JSON."""
    from dho2_tf.training.data import load_mnist1d
    from dho2_tf.distributed.comm import default_comm

    size = int(os.environ.get("HOROVOD_SIZE", "1"))
    share_cores_between_ranks()
    comm = default_comm(mode_class("pipelined").process_sets_for(size // 2, None)
                        if size > 1 else ())
    logging.basicConfig(level=logging.INFO if comm.is_root else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    data = load_mnist1d(num_samples=args.num_samples)
    # Untimed warm-up: the first mode run in a process pays one-off costs (eager kernels,
    # Horovod/Gloo buffers) in its timed refreshes too.
    ModeRun("sharded", comm, data, argparse.Namespace(**{**vars(args), **QUICK}), 1).record()
    results: dict[str, list[dict[str, Any]]] = {}
    delay = 0
    for mode in RUN_ORDER:
        if not mode_class(mode).all_ranks_train:   # needs a curvature and an update set
            if comm.size < 2:
                continue
            delay = auto_delay(results["sharded"], args)
        start = time.perf_counter()
        mine = ModeRun(mode, comm, data, args, delay=delay or 1).record()
        results[mode] = comm.allgather_object(mine, name=f"bench_scaling/{mode}")
        logger.info("P=%d %s done in %.1f s", comm.size, mode, time.perf_counter() - start)
    comm.barrier("bench_scaling/end")
    if comm.is_root:
        Path(args.worker_json).write_text(json.dumps({"P": comm.size, "modes": results}))
