"""Scaling benchmark: DHO2 state bytes, time and communication per rank vs P and mode.

Run (≈ 2–6 min on 2 CPU cores, depending on load)::

    python jobs/bench_scaling.py --report BENCHMARKS.md

The driver launches one worker per P ∈ {1, 2, 4}: ``horovodrun --gloo -np P -H localhost:P``
(oversubscribed on 2 cores at P = 4); P = 1 runs as a plain process with ``LocalComm``. A worker
runs every mode in one process with one ``HorovodComm`` (process sets of ``pipelined`` with
P_C = P//2 registered up front), each mode through its own ``CountingComm``, and rank 0 writes
the per-rank records. The driver prints the table and writes ``results/bench_scaling.json``
(``--output-json``) with the run's command, commit and date under ``meta``.

Report: ``--report BENCHMARKS.md`` writes the rendered section between the
``<!-- BEGIN bench_scaling -->`` and ``<!-- END bench_scaling -->`` lines of that file (the
section is named after the results file, see :func:`dho2_tf.training.report.section_name`);
``--output-md PATH`` writes it to a file of its own. ``--render-only results/bench_scaling.json``
renders an existing results file without running anything (with ``--report``: into the file)::

    python jobs/bench_scaling.py --render-only results/bench_scaling.json --report BENCHMARKS.md

Setup: MLP 40→512→200→10 (n = 125,602) on MNIST-1D (4000 samples), base Adam, k = 10, m = 40,
per-rank batch 64 (weak scaling), curvature batch 256 per rank. Measured on every rank, reported
as the maximum over ranks (pipelined: update ranks U and curvature ranks C apart):

* state bytes: ``DHO2.state_bytes()`` (persistent optimizer + curvature variables);
* step time: mean wall time of ``on_step_begin`` + the ``tf.function`` train step +
  ``on_step_end`` over the steps without a refresh (the first steps, with graph warm-up, dropped);
* refresh time: the eager ``on_step_begin`` that runs the refresh, first refresh (tracing) dropped
  (and every worker starts with an untimed sharded warm-up run);
  pipelined: the C ranks' seconds per served refresh and U's time per step from trigger to
  delivery (Δ steps, including any wait in DELIVER);
* payload bytes and number of collectives per step (traced step, plus eager per-step hooks such
  as ADMM's consensus round, amortised) and per refresh (eager), from ``CountingComm``, with a
  ring-traffic estimate per collective from its process-set size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dho2_tf.distributed.comm import CountingComm  # noqa: E402
from dho2_tf.modes import mode_class  # noqa: E402
from dho2_tf.training import report as report_lib  # noqa: E402


MODES = ("faithful", "sharded", "pipelined", "admm")        # docs/algorithm.md §4 order
RUN_ORDER = ("sharded", "faithful", "admm", "pipelined")    # pipelined last: Δ from sharded
HIDDEN = (512, 200)
QUICK = {"refresh_every": 4, "tau": 4, "delivery_delay": "3", "warm_steps": 1,
         "num_samples": 1000}
logger = logging.getLogger("bench_scaling")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", default="1,2,4", help="comma-separated P values")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: refresh every 4 steps, τ = 4, Δ = 3, 1000 samples")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--m", type=int, default=40, help="Lanczos order")
    parser.add_argument("--tau", type=int, default=8, help="admm: local steps per round")
    parser.add_argument("--batch-size", type=int, default=64, help="per rank")
    parser.add_argument("--curvature-batch", type=int, default=256, help="per rank")
    parser.add_argument("--refresh-every", type=int, default=16,
                        help="steps between refreshes; 3 refreshes run, the first is dropped")
    parser.add_argument("--warm-steps", type=int, default=3, help="first steps not timed")
    parser.add_argument("--delivery-delay", default="auto",
                        help="pipelined Δ in steps, or 'auto': ⌈1.1·T_refresh/t_step⌉ of the "
                             "sharded run (docs/performance.md), clipped to [4, --max-delay]")
    parser.add_argument("--max-delay", type=int, default=150)
    parser.add_argument("--num-samples", type=int, default=4000)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per P")
    parser.add_argument("--output-json", default="results/bench_scaling.json")
    parser.add_argument("--output-md", default=None,
                        help="also write the rendered section to this Markdown file")
    parser.add_argument("--report", default=None,
                        help="Markdown file whose bench_scaling section to replace "
                             "(e.g. BENCHMARKS.md)")
    parser.add_argument("--render-only", default=None, metavar="JSON",
                        help="render this results file (no run); with --report, into it")
    parser.add_argument("--worker-json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


# ------------------------------------------------------------------------------------ worker
def ring_bytes(kind: str, payload: float, group: int) -> float:
    """Bytes one rank sends for a collective on a ring of ``group`` ranks (payload = its input).

    allreduce 2(g−1)/g·N; reduce-scatter (g−1)/g·N (input N = full vector); all-gather
    (g−1)·N (input N = this rank's shard); broadcast ≈ N; alltoall ≤ N (what this rank sends).
    """
    if group <= 1:
        return 0.0
    factor = {"allreduce": 2 * (group - 1) / group, "reducescatter": (group - 1) / group,
              "allgather": group - 1.0, "broadcast": 1.0, "alltoall": 1.0}[kind]
    return factor * payload


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


def worker(args: argparse.Namespace) -> None:
    """Runs on every rank (under horovodrun for P > 1): all modes; rank 0 writes the JSON."""
    from dho2_tf.training.data import load_mnist1d
    from dho2_tf.distributed.comm import default_comm

    size = int(os.environ.get("HOROVOD_SIZE", "1"))
    report_lib.share_cores_between_ranks()
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


# ------------------------------------------------------------------------------------ report
# docs/algorithm.md §8.2–§8.3 (ring bytes per rank) and §8.4 (state bytes) as text, per role.
FORMULAS = {
    ("faithful", "all"): ("(12+8+4k)·n", "2(P−1)/P·4n", "m·(4n + 2(P−1)/P·8n′) + (P−1)/P·4kn"),
    ("sharded", "all"): ("(12+4k)·n/P", "(P−1)/P·8n + 2(P−1)/P·12k", "(P−1)/P·8mn"),
    ("pipelined", "U"): ("(12+4k)·n/P_U", "as sharded over P_U", "4n (rank 0: bridge)"),
    ("pipelined", "C"): ("0", "0", "(P_C−1)/P_C·8mn + 4n + 4kn/P_C"),
    ("admm", "all"): ("(12+4+4+4k)·n", "2(P−1)/P·4n/τ", "(P−1)/P·(8mn + 4kn)"),
}


def predict(mode: str, role: str, n: int, k: int, m: int, p: int, tau: int) -> dict[str, float]:
    """State bytes (docs/algorithm.md §8.4), ring bytes per step and refresh (§8.2, §8.3).

    Group sizes: P for every mode but ``pipelined`` (U: P_U = P − P//2, C: P_C = P//2).
    ``basis`` is the transient Lanczos basis 8·m·⌈n/g⌉ (docs/algorithm.md §8.4; none on U ranks).
    """
    g = {"U": p - p // 2, "C": p // 2}.get(role, p)
    rs, ar = (g - 1) / g, 2 * (g - 1) / g
    return {**COST_MODELS[mode](role, n, k, m, g, tau, rs, ar),
            "basis": 0.0 if role == "U" else 8.0 * m * -(-n // g)}


def _cost_faithful(role: str, n: int, k: int, m: int, g: int, tau: int, rs: float,
                   ar: float) -> dict[str, float]:
    return {"state": (20 + 4 * k) * n, "step_ring": ar * 4 * n,
            "refresh_ring": m * ((4 * n if g > 1 else 0) + ar * 8 * n) + rs * 4 * k * n}


def _cost_sharded(role: str, n: int, k: int, m: int, g: int, tau: int, rs: float,
                  ar: float) -> dict[str, float]:
    return {"state": (12 + 4 * k) * n / g, "step_ring": rs * 8 * n + ar * 12 * k,
            "refresh_ring": rs * 8 * m * n if role == "all" else 4 * n}


def _cost_pipelined(role: str, n: int, k: int, m: int, g: int, tau: int, rs: float,
                    ar: float) -> dict[str, float]:
    if role == "U":
        return _cost_sharded(role, n, k, m, g, tau, rs, ar)
    return {"state": 0.0, "step_ring": 0.0, "refresh_ring": rs * 8 * m * n + 4 * n + 4 * k * n / g}


def _cost_admm(role: str, n: int, k: int, m: int, g: int, tau: int, rs: float,
               ar: float) -> dict[str, float]:
    return {"state": (20 + 4 * k) * n, "step_ring": ar * 4 * n / tau,
            "refresh_ring": rs * (8 * m * n + 4 * k * n)}


#: The cost model of each mode (docs/algorithm.md §8.2–§8.4), per role of a rank.
COST_MODELS = {"faithful": _cost_faithful, "sharded": _cost_sharded,
               "pipelined": _cost_pipelined, "admm": _cost_admm}


def largest(records: list[dict[str, Any]], *path: str) -> float | None:
    """Maximum over ranks of the value at ``path`` (``None`` entries skipped)."""
    values = []
    for rec in records:
        value: Any = rec
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            values.append(value)
    return max(values) if values else None


def aggregate(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (P, mode, role) with the maximum over ranks and the predictions."""
    settings, rows = report["meta"]["settings"], []
    for block in report["results"]:
        p = block["P"]
        for mode in MODES:
            records = block["modes"].get(mode)
            if not records:
                rows.append({"P": p, "mode": mode, "role": "—", "ranks": 0, "available": False,
                             "why": "needs ≥ 2 ranks"})
                continue
            for role in ("all", "U", "C"):
                mine = [r for r in records if r["role"] == role]
                if not mine:
                    continue
                row = {"P": p, "mode": mode, "role": role, "ranks": len(mine), "available": True,
                       "n": mine[0]["n"], "delay": mine[0].get("delay")}
                for key in ("state_bytes", "step_seconds", "refresh_seconds",
                            "window_step_seconds", "deliver_wait_seconds"):
                    row[key] = largest(mine, key)
                for phase in ("step", "refresh"):
                    for key in ("payload", "count", "ring"):
                        row[f"{phase}_{key}"] = largest(mine, phase, key)
                row["predicted"] = predict(mode, role, row["n"], settings["k"], settings["m"],
                                           p, settings["tau"])
                row["lost_seconds"] = row["refresh_seconds"] if role == "all" else (
                    row["delay"] * (row["window_step_seconds"] - row["step_seconds"])
                    if role == "U" else None)
                rows.append(row)
    return rows


def fmt_bytes(x: float | None) -> str:
    """Bytes in B, kB or MB (decimal)."""
    if x is None:
        return "n/a"
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.0f} B"


def fmt(x: float | None, scale: float = 1.0, digits: int = 3) -> str:
    """``x·scale`` with ``digits`` significant digits, ``n/a`` for ``None``."""
    return "n/a" if x is None else f"{x * scale:.{digits}g}"


def label(row: dict[str, Any]) -> str:
    """Mode name with the pipelined role."""
    return row["mode"] + {"U": " (U)", "C": " (C)"}.get(row["role"], "")


TEXT_COLUMNS = ("P", "mode", "ranks", "state/rank", "pred. state", "step ms", "refresh s",
                "B/step", "ring B/step", "#/step", "B/refresh", "ring B/refresh", "#/refresh")


def row_cells(row: dict[str, Any]) -> list[str]:
    """The cells of one row of the printed table."""
    if not row["available"]:
        return [str(row["P"]), row["mode"], "0"] + [f"n/a ({row['why']})"] + ["—"] * 9
    refresh = row["refresh_seconds"]
    if row["role"] == "U":
        refresh_cell = f"{fmt(row['window_step_seconds'], 1e3)} ms/step (Δ={row['delay']})"
    else:
        refresh_cell = fmt(refresh)
    return [str(row["P"]), label(row), str(row["ranks"]), fmt_bytes(row["state_bytes"]),
            fmt_bytes(row["predicted"]["state"]), fmt(row["step_seconds"], 1e3), refresh_cell,
            fmt_bytes(row["step_payload"]), fmt_bytes(row["step_ring"]),
            fmt(row["step_count"]), fmt_bytes(row["refresh_payload"]),
            fmt_bytes(row["refresh_ring"]), fmt(row["refresh_count"])]


def text_table(report: dict[str, Any]) -> str:
    """Plain-text table of :func:`aggregate` (max over ranks)."""
    cells = [list(TEXT_COLUMNS)] + [row_cells(r) for r in aggregate(report)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(TEXT_COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in cells)


def md_table(header: list[str], lines: list[list[str]]) -> str:
    """A Markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])


def ratio_to_single(rows: list[dict[str, Any]], row: dict[str, Any]) -> str:
    """State bytes of ``row`` divided by the same mode's P = 1 value (sharded-like for U)."""
    mode = "sharded" if row["role"] == "U" else row["mode"]
    base = [r for r in rows if r["P"] == 1 and r["mode"] == mode and r["available"]]
    if not base or row["role"] == "C":
        return "—"
    return f"{row['state_bytes'] / base[0]['state_bytes']:.3f}"


NOTES = """\
### How to read the bytes

The byte columns are **payload bytes handed to Horovod** by this rank, recorded by
`CountingComm` (input tensor size × dtype size): the traced train step's collectives (one trace =
one step), plus eager per-step hooks amortised over the timed steps (ADMM's consensus allreduce
every τ steps), and the eager collectives of one curvature refresh. An all-gather's payload is the
rank's *shard* (its output is P× larger); a reduce-scatter's payload is the full padded vector.
The wire traffic of a ring implementation is roughly 2(P−1)/P × payload for an allreduce,
(P−1)/P × payload for a reduce-scatter, (P−1) × payload for an all-gather (= (P−1)/P × the
gathered vector) and ≈ payload for a broadcast; the *ring* columns apply these factors with each
collective's own process-set size (so they are 0 at P = 1, where `LocalComm` still routes the
same collectives as identities). docs/algorithm.md §8 gives per-rank ring traffic, so the
ring columns are the ones to compare with them (leading terms only: O(m²), O(k²) and O(k)
vectors are omitted from the predictions).
"""


def findings(rows: list[dict[str, Any]], settings: dict[str, Any]) -> list[str]:
    """Bullet points comparing the measured scaling with the cost model (computed from rows)."""
    def get(p: int, mode: str, role: str = "all") -> dict[str, Any] | None:
        found = [r for r in rows if r["P"] == p and r["mode"] == mode and r["role"] == role
                 and r["available"]]
        return found[0] if found else None

    out, ps = [], sorted({r["P"] for r in rows})
    top = ps[-1]
    single = get(1, "sharded")
    if single:
        ratios = ", ".join(f"P={p}: {get(p, 'sharded')['state_bytes'] / single['state_bytes']:.3f}"
                           for p in ps if p > 1 and get(p, "sharded"))
        out.append(f"**sharded state scales as 1/P**, as predicted: state(P)/state(1) = {ratios}. "
                   "The excess over 1/P is the padding of n to P·⌈n/P⌉ and the replicated "
                   "K-sized variables (λ, Γ, η, c, counters).")
    for mode, what in (("faithful", "V, Adam, momentum, π, θ̃"),
                       ("admm", "V, local Adam and momentum, z, π")):
        values = sorted({get(p, mode)["state_bytes"] for p in ps if get(p, mode)})
        if values:
            out.append(f"**{mode} state is constant in P** ({', '.join(map(fmt_bytes, values))})"
                       f", as predicted: {what} are replicated.")
    c_row = get(top, "pipelined", "C")
    if c_row and c_row["state_bytes"] < 4 * c_row["n"]:
        out.append(
            f"**pipelined curvature ranks keep no parameter-sized state** "
            f"({fmt_bytes(c_row['state_bytes'])} at P={top}: λ, Γ, η, c and counters), as §8.4 "
            "predicts. Their curvature memory is the transient Lanczos basis 8·m·n/P_C (not a "
            "variable, so not in `state_bytes`).")
    elif c_row:
        out.append(
            f"**pipelined curvature ranks hold optimizer state they never use** "
            f"({fmt_bytes(c_row['state_bytes'])} at P={top}; expected: 0): the base slots, "
            "Newton momentum and V shard are allocated with U rank 0's shard size.")
    f_row = get(top, "faithful")
    if f_row and top > 1:
        out.append(
            f"**faithful refresh traffic is below the released pattern's 20·m·n** (P={top}: "
            f"{fmt_bytes(f_row['refresh_ring'])} measured vs "
            f"{fmt_bytes(f_row['predicted']['refresh_ring'])} predicted). dho2_tf's faithful "
            "Lanczos broadcasts rank 0's HVP (4n) like the released code, but keeps the basis "
            "sharded and all-gathers the next Lanczos vector as fp32 shards (≈ (P−1)/P·4n) "
            "instead of the released code's fp64 allreduce of n′ (2(P−1)/P·8n).")
    out.append(
        "**payload that §8 does not list**: every refresh broadcasts the Lanczos start vector q₀ "
        "as n fp64 (8n) from the group root, and `faithful`/`admm` all-gather V (k·n fp32) "
        "after the estimate. The sharded step matches §8.2 exactly (reduce-scatter n + "
        "all-gather n + allreduce 2k + allreduce k: payload 4n′ + 4n′/P + 12k); `faithful` "
        f"sends one allreduce of n per step and `admm` one every τ = {settings['tau']} steps.")
    low = min([p for p in ps if p > 1], default=None)     # not oversubscribed at P = 2
    sharded, faithful = get(low, "sharded"), get(low, "faithful")
    if single and sharded and faithful:
        per_collective = (sharded["refresh_seconds"] - single["refresh_seconds"]) / \
            sharded["refresh_count"]
        out.append(
            f"**collective count and latency**: at P={low} the sharded step takes "
            f"{fmt(sharded['step_seconds'], 1e3)} ms and the faithful step "
            f"{fmt(faithful['step_seconds'], 1e3)} ms for the same ring bytes; sharded issues "
            "four dependent collectives per step (reduce-scatter → allreduce → allreduce → "
            "all-gather), faithful one allreduce. A refresh does the same HVP work "
            f"per rank at every P, yet takes {fmt(sharded['refresh_seconds'])} s at P={low} "
            f"against {fmt(single['refresh_seconds'])} s at P=1 (no Horovod, 2 threads): at "
            f"most ≈ {fmt(per_collective * 1e3)} ms per eager collective "
            f"({fmt(sharded['refresh_count'])} per refresh). What helps: "
            "fuse small allreduces and tune `HOROVOD_CYCLE_TIME`.")
    sharded = get(top, "sharded")
    u_row = get(top, "pipelined", "U")
    if u_row and sharded and c_row:
        out.append(
            f"**pipelined at P={top}** (P_U = {u_row['ranks']}, P_C = {c_row['ranks']}, "
            f"Δ = {u_row['delay']}): the C ranks need {fmt(c_row['refresh_seconds'])} s per "
            f"refresh; U waited {fmt(u_row['deliver_wait_seconds'])} s in DELIVER and lost "
            f"{fmt(u_row['lost_seconds'])} s of training per refresh, against "
            f"{fmt(sharded['refresh_seconds'])} s for a sharded refresh over all P ranks "
            "(the pipelined run trains on P_U ranks, so its global batch is smaller). U's steps "
            f"took {fmt(u_row['window_step_seconds'], 1e3)} ms during a refresh against "
            f"{fmt(u_row['step_seconds'], 1e3)} ms outside it: C and U share the 2 cores. Δ "
            "comes from the sharded run's T_refresh/t_step.")
    out.append(
        "**times on 2 cores**: P = 4 runs 4 ranks on 2 cores (1 intra-op thread each), and "
        "other jobs may share the host (see the load averages above), so step and refresh "
        "times grow with P from CPU sharing as well as communication. Per-rank work is fixed "
        "(weak scaling), so on dedicated hardware the step time should stay roughly flat.")
    return [f"- {line}" for line in out]


def sources_line(meta: dict[str, Any]) -> str:
    """The dho2_tf sources hash at the start of the run, and at its end if they changed."""
    start, end = (meta[key].split(", ")[-1] for key in ("library", "library_end"))
    return f"- Library: {start}" + ("" if start == end else
                                    f" (**dho2_tf changed during the run**, to {end})")


def render(report: dict[str, Any], results: str) -> str:
    """The report section of a results file (``results``: its path as shown in the text)."""
    meta, rows = report["meta"], aggregate(report)
    st = meta["settings"]
    n = next(r["n"] for r in rows if r["available"])
    ok = [r for r in rows if r["available"]]
    na = [r for r in rows if not r["available"]]
    delays = [f"{r['delay']} (P={r['P']})" for r in ok if r["role"] == "U"]
    memory = [[str(r["P"]), label(r), str(r["ranks"]), fmt_bytes(r["state_bytes"]),
               FORMULAS[(r["mode"], r["role"])][0], fmt_bytes(r["predicted"]["state"]),
               ratio_to_single(rows, r), fmt_bytes(r["predicted"]["basis"])] for r in ok]
    timing = [[str(r["P"]), label(r), fmt(r["step_seconds"], 1e3),
               fmt(r["refresh_seconds"]) if r["role"] != "U" else
               f"{fmt(r['window_step_seconds'], 1e3)} ms/step over Δ={r['delay']} steps; "
               f"DELIVER wait {fmt(r['deliver_wait_seconds'])} s",
               fmt(r["lost_seconds"]) if r["lost_seconds"] is not None else "—"] for r in ok]
    comm = [[str(r["P"]), label(r), fmt(r[f"{ph}_count"]), fmt_bytes(r[f"{ph}_payload"]),
             fmt_bytes(r[f"{ph}_ring"]), FORMULAS[(r["mode"], r["role"])][i],
             fmt_bytes(r["predicted"][f"{ph}_ring"])]
            for ph, i in (("step", 1), ("refresh", 2)) for r in ok]
    half = len(comm) // 2
    comm_header = ["P", "mode", "collectives", "payload", "ring (est.)", "§8 formula",
                   "predicted ring"]
    lines = [
        "Generated by `jobs/bench_scaling.py`; every number is the maximum over the "
        "ranks of the row (pipelined: update ranks U and curvature ranks C separately).",
        "",
        *report_lib.provenance_lines(meta, results, meta["wall_seconds"]),
        sources_line(meta),
        f"- Machine: {meta['machine']}; P = 4 is oversubscribed (4 ranks on 2 cores). "
        "1-min load average before/after each P (other jobs may share the host): "
        + ", ".join(f"P={b['P']}: {b['loadavg'][0]}/{b['loadavg'][1]}" for b in report["results"]),
        f"- Software: Python {meta['versions']['python']}, TensorFlow "
        f"{meta['versions']['tensorflow']}, Horovod {meta['versions']['horovod']} (Gloo)",
        f"- Setup: MLP 40→{'→'.join(map(str, meta['hidden']))}→10, n = {n:,} parameters, "
        f"MNIST-1D ({st['num_samples']} samples), DHO2 base Adam, k = {st['k']}, ℓ = 0, "
        f"m = {st['m']}, per-rank batch {st['batch_size']} (weak scaling), curvature batch "
        f"{st['curvature_batch']} per rank; refresh every {st['refresh_every']} steps "
        f"(pipelined: triggers every 2Δ, Δ = {', '.join(delays) or 'n/a'}, chosen as "
        "⌈1.1·T_refresh/t_step⌉ of the sharded run, docs/algorithm.md §7.3), τ = "
        f"{st['tau']} (admm), P_C = P//2 (pipelined). P = 1 runs as a plain process "
        "(`LocalComm`); P > 1 under `horovodrun --gloo`." + (" **Quick run.**" if st["quick"]
                                                            else ""),
        "- Not run: " + ", ".join(f"{r['mode']} at P={r['P']} ({r['why']})" for r in na)
        if na else "- Every mode ran at every P.",
        "",
        "### Optimizer + curvature state per rank",
        "",
        "`DHO2.state_bytes()`: all optimizer variables (base slots, Newton momentum, V, λ, Γ, η, "
        "c, mode state such as the window vectors or ADMM's z and π). Excludes θ, gradients, "
        "activations and the transient Lanczos basis (8·m·n/P bytes during a refresh). "
        "docs/algorithm.md §8.4: Adam (m, v) + Newton momentum = 12n, V = 4kn, window v, θ̃ = 8n "
        "(faithful), ADMM π = 4n and z = 4n. "
        "÷ P=1: against the same mode at P=1 (pipelined U: against sharded).",
        "",
        md_table(["P", "mode", "ranks", "measured", "§8.4 formula", "predicted",
                  "÷ P=1", "+ transient basis 8·m·n/P (§8.4)"], memory),
        "",
        "### Time per rank",
        "",
        "Step: mean wall time of `on_step_begin` + `tf.function` train step + `on_step_end` over "
        "the steps without a refresh. Refresh: the eager `on_step_begin` that runs the refresh "
        "(Lanczos + install), mean of the 2nd and 3rd refresh. Pipelined: C = seconds per served "
        "refresh; U = time per update step from the trigger to the end of DELIVER (Δ steps "
        "plus any wait for C). Each worker first runs an untimed sharded warm-up (the first "
        "mode in a process otherwise pays one-off costs in its timed refreshes). "
        "Training time lost per refresh: the refresh itself for the "
        "synchronous modes; Δ × (U step during refresh − U step) for pipelined.",
        "",
        md_table(["P", "mode", "step (ms)", "refresh (s)", "training time lost per refresh (s)"],
                 timing),
        "",
        "### Communication per rank",
        "",
        "#### Per step",
        "",
        md_table(comm_header, comm[:half]),
        "",
        "#### Per refresh",
        "",
        md_table(comm_header, comm[half:]),
        "",
        NOTES,
        "### Measured vs the predicted scaling (docs/algorithm.md §8)",
        "",
        *findings(rows, st),
        "",
        "Raw per-rank records (including bytes by collective kind) are in the results file.",
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ driver
def launch(args: argparse.Namespace, ranks: int, json_path: Path) -> None:
    """Run the worker for P = ``ranks`` (plain process at P = 1, else horovodrun)."""
    script = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:],
              "--worker-json", str(json_path)]
    if ranks > 1:
        horovodrun = Path(sys.executable).parent / "horovodrun"
        script = [str(horovodrun), "--gloo", "-np", str(ranks), "-H", f"localhost:{ranks}",
                  *script]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2",
           "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // ranks))}
    proc = subprocess.Popen(script, cwd=REPO, env=env)
    try:
        code = proc.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise RuntimeError(f"P={ranks} did not finish in {args.timeout:.0f} s (hang?): "
                           f"{' '.join(script)}") from None
    if code != 0:
        raise subprocess.CalledProcessError(code, script)


def stop(proc: subprocess.Popen) -> None:
    """Terminate ``proc`` (horovodrun stops its ranks when terminated), then kill it."""
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def library_version() -> str:
    """Short git commit plus a hash of the dho2_tf sources the run imports (edits show up)."""
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                         text=True)
    digest = hashlib.sha1()
    for path in sorted((REPO / "dho2_tf").rglob("*.py")):
        digest.update(path.relative_to(REPO).as_posix().encode() + path.read_bytes())
    commit = out.stdout.strip() if out.returncode == 0 else "unknown"
    return f"{commit}, dho2_tf sources sha1 {digest.hexdigest()[:10]}"


def machine() -> str:
    """One line describing the host."""
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in
                 Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}), {platform.system()} {platform.release()}"


def publish(report: dict[str, Any], results: str, args: argparse.Namespace) -> None:
    """Render ``report`` (read from or written to ``results``) into --output-md / --report."""
    text = render(report, report_lib.display_path(results, REPO))
    if args.output_md:
        Path(args.output_md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_md).write_text(text)
    if args.report:
        name = report_lib.update_report(args.report, results, text)
        print(f"wrote section {name} of {args.report}")


def main() -> None:
    """Driver (one worker per P, then the report), worker (``--worker-json``) or renderer
    (``--render-only``)."""
    args = parse_args()
    if args.worker_json:
        worker(args)
        return
    if args.render_only:
        report = json.loads(Path(args.render_only).read_text())
        print(render(report, report_lib.display_path(args.render_only, REPO)))
        publish(report, args.render_only, args)
        return
    if args.report:
        report_lib.check_report(args.report, args.output_json)
    run = report_lib.run_metadata(repo=REPO)   # before any result file is written
    started, library = time.perf_counter(), library_version()
    per_p = []
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in [int(p) for p in args.ranks.split(",")]:
            path = Path(tmp) / f"np{ranks}.json"
            load, begin = os.getloadavg()[0], time.perf_counter()
            launch(args, ranks, path)
            per_p.append({**json.loads(path.read_text()), "seconds": time.perf_counter() - begin,
                          "loadavg": [round(load, 2), round(os.getloadavg()[0], 2)]})
    import horovod
    import tensorflow as tf

    meta = {**run, "machine": machine(), "wall_seconds": round(time.perf_counter() - started, 1),
            "library": library, "library_end": library_version(),
            "versions": {"python": platform.python_version(), "tensorflow": tf.__version__,
                         "horovod": horovod.__version__},
            "settings": {key: getattr(args, key) for key in (
                "k", "m", "tau", "batch_size", "curvature_batch", "refresh_every",
                "warm_steps", "delivery_delay", "num_samples", "quick")},
            "hidden": list(HIDDEN)}
    report = {"meta": meta, "results": per_p}
    Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output_json).write_text(json.dumps(report, indent=1) + "\n")
    print(text_table(report))
    print(f"wall time {meta['wall_seconds']} s; wrote {args.output_json}")
    publish(report, args.output_json, args)


if __name__ == "__main__":
    main()
