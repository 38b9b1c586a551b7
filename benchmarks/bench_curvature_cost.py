"""Where DHO2's time goes: HVP against a gradient, a refresh against its HVPs, a step against the
base optimizer's Keras step.

Run it on an otherwise idle machine, once per world size::

    python benchmarks/bench_curvature_cost.py                                        # P = 1
    HOROVOD_CYCLE_TIME=0.1 horovodrun --gloo -np 2 -H localhost:2 \\
        python benchmarks/bench_curvature_cost.py                                    # P = 2

For every task (model, data set, batch) it measures, interleaving the things it compares and
repeating ``--rounds`` times (the table gives min / median / max of each ratio):

* **HVP / gradient**: the optimizer's Hessian-vector product (``make_hvp_fn``) against a
  ``tf.function`` gradient of the same loss on the same per-rank curvature batch.
* **refresh / (m·HVP)**: one curvature refresh after the first (compiled Lanczos, m = 4k HVPs,
  their reductions, re-orthogonalisation, Ritz vectors) against m HVPs, for the float32 and the
  float64 basis, split into HVPs, collectives (the same reductions timed alone) and the rest;
  the one-off compile time and the first refresh are reported apart. The float32 basis's Ritz
  values are compared with the float64 basis's on the same start vector.
* **HVP formulations**: forward-over-reverse (DHO2's default) against reverse-over-reverse,
  each on a fresh model per round (the order alternates between rounds): the one-off cost of a
  bind (building and compiling the HVP and the float32 Lanczos graphs, plus what the first
  refresh costs beyond a later one) and the HVP time. The first round of the first task also
  pays what a new process pays once (TensorFlow's own caches), so the max column is the cost a
  freshly launched job sees.
* **HVP peak memory** (``--memory``, P = 1 only): each formulation in a fresh process
  (``--memory-probe TASK METHOD``): the peak resident set after building the model and one
  gradient (baseline) and after binding and calling the HVP, from ``getrusage``.
* **warm / cold refresh**: a warm-started block refresh (``refresh_method="warm"``, 2K HVPs in
  two block products, both ``block_hvp`` batchings) against a Lanczos refresh (m = 4K HVPs) at
  the same weights, after a first Lanczos refresh, interleaved.
* **step / base step**: one epoch of ``model.fit`` with DHO2 (after its first refresh, none
  during the timed epochs) against the same epoch with the base optimizer's Keras
  implementation (heavy ball or Adam, made data-parallel with Horovod), per step.

Rank 0 prints the table and writes ``<output-dir>/curvature_cost_p<P>.json`` with the run's
command, commit and date under ``meta``. ``--report BENCHMARKS.md`` also writes the rendered
tables between the ``<!-- BEGIN bench_curvature_cost_p<P> -->`` and
``<!-- END bench_curvature_cost_p<P> -->`` lines of that file. ``--render-only JSON`` renders an
existing results file without measuring anything (with ``--report``: into that file)::

    python benchmarks/bench_curvature_cost.py --render-only results/curvature_cost_p1.json \
        --report BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks import common  # noqa: E402
from dho2_tf import models  # noqa: E402
from dho2_tf import DHO2, CurvatureRefresh  # noqa: E402
from dho2_tf.callbacks import curvature_batch_from_arrays  # noqa: E402
from dho2_tf.curvature import SpectrumEstimator, make_hvp_fn  # noqa: E402
from dho2_tf.curvature.block_ops import BLOCK_HVP_METHODS  # noqa: E402
from dho2_tf.curvature.hvp import HVP_METHODS  # noqa: E402
from dho2_tf.curvature.warm_start import BlockRitzProgram, CurvatureEstimator  # noqa: E402
from dho2_tf.training.data import load_dataset  # noqa: E402
from dho2_tf.data_position import epoch_rank_batches  # noqa: E402
from dho2_tf.distributed.comm import default_comm  # noqa: E402

# Per-rank batch sizes are the time-to-accuracy benchmark's.
TASKS: dict[str, dict[str, Any]] = {
    "mlp_mnist1d": {"model": "mlp", "dataset": "mnist1d", "batch_size": 50,
                    "curvature_batches": (250,), "base": "momentum", "learning_rate": 0.1},
    "resnet1d_mnist1d": {"model": "resnet1d", "dataset": "mnist1d", "batch_size": 50,
                         "curvature_batches": (250,), "base": "adam", "learning_rate": 3e-3},
    "logreg_mnist5k": {"model": "logreg", "dataset": "mnist5k", "batch_size": 500,
                       "curvature_batches": (500,), "base": "momentum", "learning_rate": 0.3,
                       "timed_epochs": 10},
    "autoencoder_mnist5k": {"model": "autoencoder", "dataset": "mnist5k", "batch_size": 250,
                            "curvature_batches": (250, 1000), "base": "adam",
                            "learning_rate": 1e-3},
}
K = 10
STEPS_PER_EPOCH = 40


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=list(TASKS))
    parser.add_argument("--rounds", type=int, default=5, help="interleaved repetitions")
    parser.add_argument("--output-dir", default="results")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, tiny data")
    parser.add_argument("--basis", choices=("replicated", "sharded"), default="replicated",
                        help="Lanczos basis layout of the refresh timings (default replicated, "
                             "what mode='auto' uses when the state fits)")
    parser.add_argument("--memory", action="store_true",
                        help="also measure each HVP formulation's peak memory in fresh "
                             "processes (P = 1)")
    parser.add_argument("--memory-probe", nargs=2, default=None, metavar=("TASK", "METHOD"),
                        help="internal: print the peak memory of one formulation as JSON")
    common.add_report_arguments(parser, "bench_curvature_cost_p<P>", "no measurement")
    return parser.parse_args(argv)


def seconds_per_call(fn: Callable[[], Any], calls: int) -> float:
    """Mean wall seconds of ``calls`` calls of ``fn`` (results fetched to the host)."""
    start = time.perf_counter()
    for _ in range(calls):
        out = fn()
    tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, out)
    return (time.perf_counter() - start) / calls


def spread(values: list[float]) -> dict[str, float]:
    """min / median / max."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def build(task: dict[str, Any], seed: int = 0) -> tuple[Any, ...]:
    """(model, loss, training inputs, training targets, objective) of a task (all rows)."""
    data = load_dataset(task["dataset"]) if task["dataset"] != "mnist1d" else \
        load_dataset("mnist1d", num_samples=5000)
    objective = models.objective(task["model"])
    y = objective.targets(data.x_train, data.y_train)
    tf.keras.utils.set_random_seed(seed)
    model = models.get(task["model"], data.input_shape, data.num_classes)
    return model, objective.make_loss(), data.x_train, y, objective


def curvature_part(x: np.ndarray, y: np.ndarray, batch: int, comm: Any
                   ) -> tuple[tf.Tensor, tf.Tensor]:
    """This rank's part of a curvature batch of ``batch`` rows, as every training run takes
    it (:func:`dho2_tf.callbacks.curvature_batch_from_arrays`, seed 0)."""
    x_c, y_c = curvature_batch_from_arrays(x, y, batch, comm=comm)
    return tf.constant(x_c), tf.constant(y_c)


def gradient_fn(model: tf.keras.Model, loss: Any, x: tf.Tensor, y: tf.Tensor) -> Callable:
    """``tf.function`` of the loss gradient on a fixed batch (the HVP's comparison)."""
    variables = model.trainable_variables

    @tf.function
    def grad() -> list[tf.Tensor]:
        with tf.GradientTape() as tape:
            value = loss(y, model(x, training=True))
        return tape.gradient(value, variables)

    return grad


def reductions_fn(comm: Any, n: int, m: int, layout: str) -> Callable:
    """The m HVP reductions of one refresh alone (what the basis layout communicates).

    The start vector is an argument: from a constant, graph optimisation would fold the whole
    chain of collectives at trace time and the call would time nothing.
    """
    size = comm.size
    s = -(-n // size)

    @tf.function(input_signature=[tf.TensorSpec([n], tf.float32)])
    def reduce_all(v: tf.Tensor) -> tf.Tensor:
        for i in range(m):
            if layout == "replicated":
                v = comm.allreduce(v, "mean", name=f"bench/ar{i}")
            else:
                h = comm.reducescatter(tf.pad(v, [[0, size * s - n]]), "mean",
                                       name=f"bench/rs{i}")
                v = tf.reshape(comm.allgather(h, name=f"bench/ag{i}")[:n], [n])
        return v

    return reduce_all


def hvp_and_refresh(task: dict[str, Any], comm: Any, args: argparse.Namespace
                    ) -> dict[str, Any]:
    """HVP vs gradient, and refresh vs m·HVP for each curvature batch and basis dtype."""
    model, loss, x_all, y_all, _ = build(task)
    n = int(sum(np.prod(v.shape) for v in model.trainable_variables))
    m = 4 * K
    layout = args.basis
    out: dict[str, Any] = {"parameters": n, "lanczos_order": m, "basis_layout": layout,
                           "batches": {}}
    for batch in task["curvature_batches"]:
        x, y = curvature_part(x_all, y_all, batch, comm)
        grad, hvp = gradient_fn(model, loss, x, y), make_hvp_fn(model, loss, (x, y))
        v = tf.random.stateless_normal([n], seed=[1, 2])
        estimators = {d: SpectrumEstimator(hvp, n, K, 0, comm, m=m, basis_dtype=d,
                                           basis_layout=layout, name=f"bench/{d}/{batch}")
                      for d in ("float32", "float64")}
        reduce_all = reductions_fn(comm, n, m, layout)
        one_off = {}
        for d, est in estimators.items():
            start = time.perf_counter()
            compile_s = est.trace()
            first = est.estimate(seed=0)
            one_off[d] = {"compile_seconds": compile_s,
                          "first_refresh_seconds": time.perf_counter() - start}
        v32 = tf.cast(v, tf.float32)
        grad(), hvp(v), reduce_all(v32)  # trace
        calls = 3 if args.quick else 20
        rows: dict[str, list[float]] = {"gradient": [], "hvp": [], "reductions": [],
                                        "refresh_float32": [], "refresh_float64": []}
        ritz_rel = []
        for r in range(args.rounds):
            rows["gradient"].append(seconds_per_call(grad, calls))
            rows["hvp"].append(seconds_per_call(lambda: hvp(v), calls))
            rows["reductions"].append(seconds_per_call(lambda: reduce_all(v32), 1))
            eig = {}
            for d, est in estimators.items():
                start = time.perf_counter()
                estimate = est.estimate(seed=r + 1)
                rows[f"refresh_{d}"].append(time.perf_counter() - start)
                eig[d] = estimate.eigenvalues.numpy().astype(np.float64)
            ritz_rel.append(float(np.max(np.abs(eig["float32"] - eig["float64"]))
                                  / np.max(np.abs(eig["float64"]))))
        del first
        ratio = lambda a, b: spread([x / y for x, y in zip(rows[a], rows[b])])  # noqa: E731
        hvp_m = [m * h for h in rows["hvp"]]
        entry = {"seconds": {k: spread(v) for k, v in rows.items()}, "one_off": one_off,
                 "hvp_over_gradient": ratio("hvp", "gradient"),
                 "ritz_float32_vs_float64_max_rel": spread(ritz_rel)}
        for d in ("float32", "float64"):
            refresh = rows[f"refresh_{d}"]
            entry[f"refresh_{d}_over_m_hvp"] = spread([a / b for a, b in zip(refresh, hvp_m)])
            entry[f"refresh_{d}_split"] = {
                "hvps": statistics.median(hvp_m),
                "collectives": statistics.median(rows["reductions"]) if comm.size > 1 else 0.0,
                "rest": statistics.median(refresh) - statistics.median(hvp_m)
                - (statistics.median(rows["reductions"]) if comm.size > 1 else 0.0)}
        out["batches"][str(batch)] = entry
    return out


def hvp_methods(task: dict[str, Any], comm: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Per HVP formulation: one-off bind cost (compile + first refresh − a later refresh) and
    the HVP time, on a fresh model per round, the order of the formulations alternating."""
    seconds: dict[str, dict[str, list[float]]] = {
        method: {"one_off": [], "hvp": []} for method in HVP_METHODS}
    calls = 3 if args.quick else 10
    for r in range(args.rounds):
        for method in (HVP_METHODS if r % 2 == 0 else HVP_METHODS[::-1]):
            model, loss, x_all, y_all, _ = build(task, seed=r)
            x, y = curvature_part(x_all, y_all, task["curvature_batches"][0], comm)
            n = int(sum(np.prod(v.shape) for v in model.trainable_variables))
            start = time.perf_counter()
            hvp = make_hvp_fn(model, loss, (x, y), method=method)
            est = SpectrumEstimator(hvp, n, K, 0, comm, m=4 * K, basis_dtype="float32",
                                    basis_layout=args.basis, name=f"bench/{method}/{r}")
            est.trace()
            est.estimate(seed=0)
            bind_and_first = time.perf_counter() - start
            start = time.perf_counter()
            est.estimate(seed=1)
            seconds[method]["one_off"].append(bind_and_first - (time.perf_counter() - start))
            v = tf.random.stateless_normal([n], seed=[1, 2])
            hvp(v)  # a standalone call instantiates the function once
            seconds[method]["hvp"].append(seconds_per_call(lambda: hvp(v), calls))
    rev, fwd = seconds["reverse-over-reverse"]["one_off"], seconds["forward-over-reverse"][
        "one_off"]
    return {"seconds": {m: {k: spread(v) for k, v in rows.items()}
                        for m, rows in seconds.items()},
            "one_off_reverse_over_forward": spread([a / b for a, b in zip(rev, fwd)])}


def peak_rss_mib() -> float:
    """This process's peak resident set so far (Linux ``ru_maxrss`` is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def memory_probe(task_name: str, method: str, quick: bool) -> dict[str, float]:
    """In this (fresh) process: peak memory after the model and one gradient, then after
    binding ``method``'s HVP and calling it three times."""
    task = TASKS[task_name]
    model, loss, x_all, y_all, _ = build(task)
    x, y = curvature_part(x_all, y_all, 8 if quick else task["curvature_batches"][0], None)
    [g.numpy() for g in gradient_fn(model, loss, x, y)()]
    baseline = peak_rss_mib()
    hvp = make_hvp_fn(model, loss, (x, y), method=method)
    n = int(sum(np.prod(v.shape) for v in model.trainable_variables))
    for i in range(3):
        hvp(tf.random.stateless_normal([n], seed=[i, 7])).numpy()
    return {"baseline_mib": baseline, "peak_mib": peak_rss_mib()}


def hvp_memory(task_name: str, args: argparse.Namespace) -> dict[str, Any]:
    """:func:`memory_probe` of every formulation, each in a fresh process."""
    import subprocess

    out = {}
    for method in HVP_METHODS:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", task_name,
               method] + (["--quick"] if args.quick else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True,
                              env={k: v for k, v in os.environ.items()
                                   if not k.startswith(("HOROVOD_", "OMPI_", "PMI_"))})
        out[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def warm_vs_cold(task: dict[str, Any], comm: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Seconds of a warm-started block refresh (each batching) and of a Lanczos refresh at the
    same weights, after a first Lanczos refresh; interleaved over the rounds."""
    model, loss, x_all, y_all, _ = build(task)
    x, y = curvature_part(x_all, y_all, task["curvature_batches"][0], comm)
    n = int(sum(np.prod(v.shape) for v in model.trainable_variables))
    hvp = make_hvp_fn(model, loss, (x, y))
    lanczos = SpectrumEstimator(hvp, n, K, 0, comm, m=4 * K, basis_dtype="float32",
                                basis_layout=args.basis, name="bench/cold")
    # "vectorized" takes the HVP DHO2 binds for it: the layers' state updates skipped.
    block_hvps = {b: hvp if b == "map" else make_hvp_fn(model, loss, (x, y),
                                                        skip_layer_updates=True)
                  for b in BLOCK_HVP_METHODS}
    estimators = {b: CurvatureEstimator(lanczos, BlockRitzProgram(
        block_hvps[b], n, K, 0, comm, basis_dtype="float32", basis_layout=args.basis,
        batching=b, name=f"bench/warm/{b}")) for b in BLOCK_HVP_METHODS}
    for est in estimators.values():
        est.trace()
    first = estimators[BLOCK_HVP_METHODS[0]].estimate(seed=0)
    start_pairs = estimators[BLOCK_HVP_METHODS[0]].last
    seconds: dict[str, list[float]] = {"lanczos": [], **{f"warm_{b}": [] for b in estimators}}
    hvps = {"lanczos": first.hvps}
    for r in range(args.rounds):
        began = time.perf_counter()
        lanczos.estimate(seed=r + 1)
        seconds["lanczos"].append(time.perf_counter() - began)
        for b, est in estimators.items():
            began = time.perf_counter()
            warm = est.block.estimate(start_pairs, seed=r + 1)
            seconds[f"warm_{b}"].append(time.perf_counter() - began)
            hvps[f"warm_{b}"] = warm.hvps
    return {"seconds": {k: spread(v) for k, v in seconds.items()}, "hvps": hvps}


def compiled_model(task: dict[str, Any], comm: Any, optimizer: Any) -> tuple[Any, ...]:
    """A fresh model compiled with ``optimizer``, this rank's rows of the first
    :data:`STEPS_PER_EPOCH` global batches (the rule every run uses, seed 0), and the whole
    training set (its inputs and targets)."""
    model, loss, x, y, objective = build(task)
    model.compile(optimizer=optimizer, loss=loss, metrics=list(objective.metrics))
    rows = np.concatenate(epoch_rank_batches(0, len(x), comm.size * task["batch_size"],
                                             comm.rank, comm.size, seed=0)[:STEPS_PER_EPOCH])
    return model, x[rows], y[rows], x, y


def step_times(task: dict[str, Any], comm: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Per-step seconds of ``fit`` with DHO2 (after one refresh) and with the Keras base."""
    lr, base = task["learning_rate"], task["base"]
    keras_base = tf.keras.optimizers.Adam(lr) if base == "adam" else \
        tf.keras.optimizers.SGD(lr, momentum=0.9)
    dho2 = DHO2(learning_rate=lr, base=base, k=K, alpha=0.01, refresh_every=10 ** 9, warmup=1,
                comm=comm)
    runs: dict[str, tuple[Any, ...]] = {
        "dho2": compiled_model(task, comm, dho2),
        "base": compiled_model(task, comm, comm.data_parallel_optimizer(keras_base))}
    curvature = curvature_part(*runs["dho2"][3:], task["curvature_batches"][0], comm)
    callbacks = {"dho2": [CurvatureRefresh(batch=curvature)], "base": []}
    if comm.size > 1:
        import horovod.tensorflow.keras as hvd_keras

        callbacks["base"].append(hvd_keras.callbacks.BroadcastGlobalVariablesCallback(0))

    def epoch(name: str, epochs: int = 1) -> float:
        model, x, y = runs[name][:3]
        start = time.perf_counter()
        model.fit(x, y, batch_size=task["batch_size"], epochs=epochs, shuffle=False,
                  verbose=0, callbacks=callbacks[name])
        return (time.perf_counter() - start) / (epochs * (len(x) // task["batch_size"]))

    for name in runs:
        epoch(name)  # compile, first refresh, warm caches
    seconds: dict[str, list[float]] = {"dho2": [], "base": []}
    epochs = task.get("timed_epochs", 1)  # small data sets: several epochs per measurement
    for _ in range(args.rounds):
        for name in runs:
            seconds[name].append(epoch(name, epochs))
    return {"base": base, "resolved_mode": getattr(dho2, "resolved_mode", dho2.mode),
            "refreshes": int(dho2.refresh_index()),
            "seconds_per_step": {k: spread(v) for k, v in seconds.items()},
            "dho2_over_base": spread([a / b for a, b in zip(seconds["dho2"], seconds["base"])])}


def fmt(s: dict[str, float], scale: float = 1.0, digits: int = 2) -> str:
    """``median [min, max]``."""
    return (f"{s['median'] * scale:.{digits}f} [{s['min'] * scale:.{digits}f}, "
            f"{s['max'] * scale:.{digits}f}]")


def table(results: dict[str, Any], size: int) -> str:
    """The printed report: the world size, then :func:`tables`."""
    return f"P = {size}\n\n" + tables(results)


def tables(results: dict[str, Any]) -> str:
    """Markdown tables: HVP and refresh costs, then step costs."""
    lines = ["| task | curv. batch | gradient (ms) | HVP (ms) | HVP / gradient | refresh fp32 (s) "
             "| refresh fp32 / (m·HVP) | refresh fp64 / (m·HVP) | fp32 split HVPs / coll. / rest "
             "(s) | compile + first refresh (s) | fp32 vs fp64 Ritz max rel |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        for batch, e in res["curvature"]["batches"].items():
            sec, split = e["seconds"], e["refresh_float32_split"]
            one = e["one_off"]["float32"]
            lines.append(
                f"| {name} | {batch} | {fmt(sec['gradient'], 1e3, 1)} | {fmt(sec['hvp'], 1e3, 1)}"
                f" | {fmt(e['hvp_over_gradient'])} | {fmt(sec['refresh_float32'], 1, 3)} | "
                f"{fmt(e['refresh_float32_over_m_hvp'])} | {fmt(e['refresh_float64_over_m_hvp'])}"
                f" | {split['hvps']:.3f} / {split['collectives']:.3f} / {split['rest']:.3f} | "
                f"{one['compile_seconds']:.2f} + {one['first_refresh_seconds']:.2f} | "
                f"{e['ritz_float32_vs_float64_max_rel']['max']:.1e} |")
    if any("hvp_methods" in res for res in results.values()):
        lines += ["", "| task | one-off bind, reverse-over-reverse (s) | one-off bind, "
                  "forward-over-reverse (s) | reverse / forward | HVP rev. (ms) | HVP fwd. (ms) |",
                  "|---|---|---|---|---|---|"]
    for name, res in results.items():
        if "hvp_methods" not in res:   # results files before the formulations were compared
            continue
        hm = res["hvp_methods"]
        rev, fwd = (hm["seconds"][m] for m in ("reverse-over-reverse", "forward-over-reverse"))
        lines.append(f"| {name} | {fmt(rev['one_off'])} | {fmt(fwd['one_off'])} | "
                     f"{fmt(hm['one_off_reverse_over_forward'])} | {fmt(rev['hvp'], 1e3, 1)} | "
                     f"{fmt(fwd['hvp'], 1e3, 1)} |")
    if any("hvp_memory" in res for res in results.values()):
        lines += ["", "| task | formulation | baseline peak (MiB) | peak after HVPs (MiB) |",
                  "|---|---|---|---|"]
    for name, res in results.items():
        for method, mem in res.get("hvp_memory", {}).items():
            lines.append(f"| {name} | {method} | {mem['baseline_mib']:.0f} | "
                         f"{mem['peak_mib']:.0f} |")
    if any("warm_refresh" in res for res in results.values()):
        lines += ["", "| task | refresh | HVPs | seconds |", "|---|---|---|---|"]
    for name, res in results.items():
        warm = res.get("warm_refresh")
        for key, sec in (warm or {}).get("seconds", {}).items():
            lines.append(f"| {name} | {key} | {warm['hvps'][key]} | {fmt(sec, 1, 3)} |")
    lines += ["", "| task | DHO2 layout | base | DHO2 step (ms) | base step (ms) | "
              "DHO2 / base |", "|---|---|---|---|---|---|"]
    for name, res in results.items():
        st = res["steps"]
        base = st.get("base", TASKS[name]["base"])  # results files before "base" was kept
        lines.append(f"| {name} | {st['resolved_mode']} | {base} | "
                     f"{fmt(st['seconds_per_step']['dho2'], 1e3)} | "
                     f"{fmt(st['seconds_per_step']['base'], 1e3)} | {fmt(st['dho2_over_base'])} |")
    return "\n".join(lines)


def render(payload: dict[str, Any], results: str) -> str:
    """The report section of a results file (``results``: its path as shown in the text)."""
    lines = common.provenance_lines(payload.get("meta"), results, payload.get("wall_seconds"))
    return "\n".join([*lines, "", tables(payload["results"])]) + "\n"


def write_results(path: str, meta: dict[str, str], results: dict[str, Any], text: str,
                  args: argparse.Namespace, comm: Any, seconds: float) -> None:
    """Write the results file (rank 0), then its section into ``--report`` if given."""
    payload = {"meta": meta, "machine": common.machine(comm.size), "ranks": comm.size,
               "rounds": args.rounds, "horovod_cycle_time_ms": os.environ.get("HOROVOD_CYCLE_TIME"),
               "wall_seconds": seconds, "results": results, "table": text}
    common.save_results(path, payload)
    print(f"wrote {path}", flush=True)
    common.publish(path, render, args.report)


def main(argv: list[str] | None = None) -> int:
    """Measure every task; rank 0 prints and writes the results (``--render-only``: only
    render a results file)."""
    args = parse_args(argv)
    if args.memory_probe:
        print(json.dumps(memory_probe(*args.memory_probe, args.quick)), flush=True)
        return 0
    if args.render_only:
        common.publish(args.render_only, render, args.report, show=True)
        return 0
    if args.quick:
        args.rounds = 1
    logging.basicConfig(level=logging.WARNING)
    comm = default_comm()
    if args.report and comm.is_root:
        common.check_report(args.report, f"curvature_cost_p{comm.size}.json")
    typed = None if argv is None else [common.display_path(__file__), *argv]
    # Read before any result file is written (that would mark the tree dirty).
    meta = common.run_metadata(typed, launcher=common.horovod_launcher()) if comm.is_root else {}
    started = time.perf_counter()
    results = {}
    for name in args.tasks:
        task = TASKS[name]
        results[name] = {"hvp_methods": hvp_methods(task, comm, args),
                         "warm_refresh": warm_vs_cold(task, comm, args),
                         "curvature": hvp_and_refresh(task, comm, args),
                         "steps": step_times(task, comm, args)}
        if args.memory and comm.size == 1:
            results[name]["hvp_memory"] = hvp_memory(name, args)
        if comm.is_root:
            print(f"{name} done ({time.perf_counter() - started:.0f}s)", flush=True)
    if comm.is_root:
        text = table(results, comm.size)
        print("\n" + text, flush=True)
        os.makedirs(args.output_dir, exist_ok=True)
        path = os.path.join(args.output_dir, f"curvature_cost_p{comm.size}.json")
        write_results(path, meta, results, text, args, comm, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
