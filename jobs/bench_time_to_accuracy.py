"""Time to a target test accuracy: DHO2 vs Horovod data-parallel Adam and SGD-momentum.

One process group runs everything (TensorFlow starts once)::

    horovodrun --gloo -np 2 -H localhost:2 python jobs/bench_time_to_accuracy.py

For each task (same model, data, ranks and global batch for every optimizer) the script first
sweeps each optimizer's learning rate on a sweep seed (the rate with the shortest time to the
target wins; ties and misses go to the best accuracy), then trains every optimizer with its rate
on the measurement seeds. Protocol (algorithm reference §9.3): wall time to the first epoch whose
test accuracy (full test set) reaches the target; evaluation is off the clock, everything else
(curvature refreshes, collectives, tracing) is on it. Rank 0 prints the table, where DHO2's time
goes, and writes ``<output-dir>/time_to_accuracy.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dho2_tf.distributed.comm import default_comm  # noqa: E402
from dho2_tf.experiment import TrainConfig, train  # noqa: E402

# Every optimizer of a task shares these (model, data, per-rank batch, epoch cap, target).
TASKS: dict[str, dict[str, Any]] = {
    "mlp_mnist1d": {"model": "mlp", "dataset": "mnist1d", "num_samples": 5000,
                    "batch_size": 50, "epochs": 40, "target_accuracy": 0.60},
    "resnet1d_mnist1d": {"model": "resnet1d", "dataset": "mnist1d", "num_samples": 5000,
                         "batch_size": 50, "epochs": 20, "target_accuracy": 0.95},
}
COMMON = {"schedule": "constant", "weight_decay": 0.0, "verbose": 0}
# Optimizer settings and learning-rate grids of the sweep.
METHODS: dict[str, dict[str, Any]] = {
    "dho2": {"settings": {"optimizer": "dho2", "base": "adam", "k": 10, "alpha": 0.1,
                          "refresh_every": 320, "warmup": 40, "curvature_batch": 250},
             "learning_rates": [1e-3, 3e-3, 1e-2]},
    "adam": {"settings": {"optimizer": "adam"}, "learning_rates": [1e-3, 3e-3, 1e-2]},
    "momentum": {"settings": {"optimizer": "momentum", "momentum": 0.9},
                 "learning_rates": [0.03, 0.1, 0.3]},
}
BASELINES = ("adam", "momentum")
SWEEP_SEED = 100
QUICK = {"num_samples": 1000, "epochs": 2, "target_accuracy": 0.2}
QUICK_DHO2 = {"refresh_every": 6, "warmup": 4, "k": 4}  # a refresh happens in the smoke run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: no sweep (middle rate of each grid), 1 seed, 2 epochs, "
                             "1000 samples")
    parser.add_argument("--seeds", type=int, default=3, help="measurement seeds (default 3)")
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=sorted(TASKS),
                        help="tasks to run (default: all)")
    parser.add_argument("--output-dir", default="results",
                        help="folder for time_to_accuracy.json and .png (default results/)")
    return parser.parse_args(argv)


def task_settings(task: str, quick: bool) -> dict[str, Any]:
    """The shared settings of ``task`` (shrunk for ``--quick``)."""
    settings = {**COMMON, **TASKS[task]}
    return {**settings, **QUICK} if quick else settings


def run_one(task: dict[str, Any], method: str, lr: float, seed: int,
            quick: bool = False) -> dict[str, Any]:
    """Train once; the record keeps the curve and DHO2's refresh times."""
    settings = dict(METHODS[method]["settings"])
    if quick and method == "dho2":
        settings.update(QUICK_DHO2)
    config = TrainConfig(**task, **settings, learning_rate=lr, seed=seed)
    result = train(config)
    refresh = sum(r["seconds"] for r in result.refreshes)
    epochs_run = len(result.history)
    steps = epochs_run * result.steps_per_epoch
    return {"method": method, "learning_rate": lr, "seed": seed,
            "time_to_target": result.time_to_target, "best_accuracy": result.best_accuracy,
            "train_seconds": result.train_seconds, "epochs": epochs_run, "steps": steps,
            "refresh_seconds": refresh, "refreshes": len(result.refreshes),
            "step_seconds": (result.train_seconds - refresh) / max(steps, 1),
            "curve": [(row["seconds"], row["test_accuracy"]) for row in result.history]}


def sweep_key(record: dict[str, Any]) -> tuple[float, float]:
    """Sort key: reached the target sooner, then higher best accuracy."""
    ttt = record["time_to_target"]
    return (float("inf") if ttt is None else ttt, -record["best_accuracy"])


def log(comm: Any, message: str) -> None:
    """Progress line on rank 0."""
    if comm.is_root:
        print(message, flush=True)


def describe(record: dict[str, Any]) -> str:
    """One progress line for a finished run."""
    ttt = record["time_to_target"]
    return (f"  {record['method']:<9} lr={record['learning_rate']:<7g} seed={record['seed']:<4}"
            f" time_to_target={'miss' if ttt is None else f'{ttt:.1f}s':<7}"
            f" best={record['best_accuracy']:.3f} epochs={record['epochs']}"
            f" refresh={record['refresh_seconds']:.1f}s")


def run_task(name: str, args: argparse.Namespace, comm: Any) -> dict[str, Any]:
    """Sweep, then measure every method on the seeds."""
    task = task_settings(name, args.quick)
    log(comm, f"== {name}: {task}")
    sweep: dict[str, list[dict[str, Any]]] = {}
    chosen: dict[str, float] = {}
    for method, spec in METHODS.items():
        sweep[method] = []
        if args.quick:
            chosen[method] = spec["learning_rates"][len(spec["learning_rates"]) // 2]
            continue
        for lr in spec["learning_rates"]:
            sweep[method].append(run_one(task, method, lr, SWEEP_SEED))
            log(comm, "sweep" + describe(sweep[method][-1]))
        chosen[method] = min(sweep[method], key=sweep_key)["learning_rate"]
    log(comm, f"   chosen learning rates: {chosen}")
    seeds = range(1 if args.quick else args.seeds)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    for seed in seeds:  # methods interleaved per seed, so drift of the machine hits all alike
        for method in METHODS:
            runs[method].append(run_one(task, method, chosen[method], seed, args.quick))
            log(comm, "run  " + describe(runs[method][-1]))
    return {"task": task, "chosen_learning_rates": chosen, "sweep": sweep, "runs": runs,
            "summary": summarize(runs)}


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Median and range of the time to target per method, and DHO2's speed-up."""
    out: dict[str, Any] = {}
    for method, records in runs.items():
        times = [r["time_to_target"] for r in records]
        reached = [t for t in times if t is not None]
        padded = [float("inf") if t is None else t for t in times]
        out[method] = {"median": statistics.median(padded), "min": min(padded),
                       "max": max(padded), "reached": len(reached), "seeds": len(times),
                       "step_seconds": statistics.median(r["step_seconds"] for r in records),
                       "refresh_seconds": statistics.median(r["refresh_seconds"]
                                                            for r in records),
                       "refreshes": statistics.median(r["refreshes"] for r in records),
                       "best_accuracy": statistics.median(r["best_accuracy"] for r in records)}
    best = min(BASELINES, key=lambda m: out[m]["median"])
    dho2 = out["dho2"]["median"]
    out["best_baseline"] = best
    ratio = out[best]["median"] / dho2 if dho2 > 0 else float("nan")
    out["speedup_vs_best_baseline"] = ratio if 0 < ratio < float("inf") else None  # None: n/a
    return out


def fmt_seconds(value: float) -> str:
    """Seconds, or 'miss' when the target was not reached."""
    return "miss" if value == float("inf") else f"{value:.1f}"


def table(results: dict[str, Any]) -> str:
    """Markdown table of all tasks, plus where DHO2's time goes."""
    lines = ["| task | target | optimizer | lr | time to target (s), median [min, max] | reached "
             "| best acc (median) | step time (ms) | refresh total (s) | speed-up of DHO2 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for name, res in results.items():
        summary, target = res["summary"], res["task"]["target_accuracy"]
        speedup = summary["speedup_vs_best_baseline"]
        for method in METHODS:
            s = summary[method]
            ratio = "" if method != "dho2" else "n/a" if speedup is None else \
                f"{speedup:.2f}x vs {summary['best_baseline']}"
            lines.append(
                f"| {name} | {target:.2f} | {method} | {res['chosen_learning_rates'][method]:g} | "
                f"{fmt_seconds(s['median'])} [{fmt_seconds(s['min'])}, {fmt_seconds(s['max'])}]"
                f" | {s['reached']}/{s['seeds']} | {s['best_accuracy']:.3f} | "
                f"{1e3 * s['step_seconds']:.1f} | {s['refresh_seconds']:.1f} | {ratio} |")
        d, b = summary["dho2"], summary[summary["best_baseline"]]
        notes.append(
            f"{name}: DHO2 time goes to {d['refreshes']:.0f} curvature refreshes totalling "
            f"{d['refresh_seconds']:.1f}s (median per run) and steps of "
            f"{1e3 * d['step_seconds']:.1f} ms vs {1e3 * b['step_seconds']:.1f} ms for "
            f"{summary['best_baseline']} ({d['step_seconds'] / b['step_seconds']:.2f}x per step).")
    return "\n".join(lines + [""] + notes)


def plot(results: dict[str, Any], path: str) -> None:
    """Test accuracy vs training wall time, one panel per task, one colour per optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    colors = {"dho2": "tab:red", "adam": "tab:blue", "momentum": "tab:green"}
    for ax, (name, res) in zip(axes[0], results.items()):
        for method, records in res["runs"].items():
            for i, record in enumerate(records):
                xs, ys = zip(*record["curve"]) if record["curve"] else ((), ())
                ax.plot(xs, ys, color=colors[method], alpha=0.8, marker=".",
                        label=f"{method} (lr {record['learning_rate']:g})" if i == 0 else None)
        ax.axhline(res["task"]["target_accuracy"], color="grey", ls="--", lw=1, label="target")
        ax.set(title=name, xlabel="training wall time (s), evaluation excluded",
               ylabel="test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine(comm: Any) -> dict[str, Any]:
    """What the numbers were measured on."""
    import horovod
    import tensorflow as tf

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ranks": comm.size,
            "python": platform.python_version(), "tensorflow": tf.__version__,
            "horovod": horovod.__version__, "platform": platform.platform(),
            "horovod_cycle_time_ms": os.environ.get("HOROVOD_CYCLE_TIME", "default (1)")}


def main(argv: list[str] | None = None) -> int:
    """Run every task and write the results on rank 0."""
    args = parse_args(argv)
    comm = default_comm()
    logging.basicConfig(level=logging.WARNING)
    started, load_start = time.perf_counter(), os.getloadavg()
    train(TrainConfig(**{**task_settings("mlp_mnist1d", True), "epochs": 1,
                         "optimizer": "adam", "learning_rate": 1e-3}))  # warm TensorFlow up
    results = {name: run_task(name, args, comm) for name in args.tasks}
    wall = time.perf_counter() - started
    if comm.is_root:
        text = table(results)
        print("\n" + text + f"\n\nbenchmark wall time: {wall:.0f}s; load average (1/5/15 min) "
              f"at start {load_start}, at end {os.getloadavg()}", flush=True)
        os.makedirs(args.output_dir, exist_ok=True)
        path = os.path.join(args.output_dir, "time_to_accuracy")
        payload = {"machine": machine(comm), "quick": args.quick, "wall_seconds": wall,
                   "load_average_1_5_15min": {"start": load_start, "end": os.getloadavg()},
                   "command": " ".join(sys.argv), "methods": METHODS, "results": results,
                   "table": text}
        with open(path + ".json", "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=1, default=str)
        plot(results, path + ".png")
        print(f"wrote {path}.json and {path}.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
