"""Time to a target: DHO2 vs its own base optimizer (heavy ball, Adam), data-parallel on Horovod.

One process group runs everything (TensorFlow starts once); the world size is the launch's::

    horovodrun --gloo -np 2 -H localhost:2 python benchmarks/bench_time_to_accuracy.py   # P = 2
    python benchmarks/bench_time_to_accuracy.py                                          # P = 1

Methods come in two pairs, each DHO2 against its own base: ``dho2_momentum`` (DHO2, base heavy
ball) vs ``momentum`` (heavy ball, β = 0.9), and ``dho2_adam`` (DHO2, base Adam) vs ``adam``.
Both members of a pair sweep the same learning-rate grid. Every method of a task shares the
model, data, ranks, per-rank batch and epoch budget. Time is the training wall time up to the
end of the first epoch that meets the target; evaluation runs after every epoch with the clock
stopped, everything else (curvature refreshes, collectives, tf.function tracing) is on the
clock. Methods are interleaved per measurement seed, so drift of the machine hits all alike.
A DHO2 run whose steps stay non-finite is stopped by DHO2 (``max_consecutive_skips``) and
counts as a miss marked "diverged"; a diverging base optimizer simply misses.

Tasks and targets:

* ``mlp_mnist1d``, ``resnet1d_mnist1d`` (MNIST-1D, 4000/1000): a fixed test-accuracy target. The
  sweep (seed 100) picks each method's rate by the shortest time to the target (ties and misses:
  best accuracy).
* ``logreg_mnist5k``, ``autoencoder_mnist5k`` (the 5,000-image MNIST subset, 4000/1000):
  training-loss targets, the protocol of FOSI (Sivan et al., ICLR 2024, arXiv:2302.08484). The
  target is the best full training-set loss (evaluated after every epoch, regularisation
  included; weight decay is 0 here) that the tuned base optimizer reaches within the epoch
  budget. The sweep tunes the base by that best loss, then the DHO2 partner by its time to the
  base's sweep target. On each measurement seed the base runs the whole budget first; its best
  loss on that seed is the target of that seed, its time is the time of its first epoch at that
  loss, and the DHO2 partner then runs on the same seed until it reaches the target (or the
  budget ends: a miss).

Settings, chosen so that one run of all four tasks (3 × 4 sweep runs and 3 seeds × 4 methods
per task, 96 runs) takes about 20-25 minutes on 2 idle cores at P = 1 or P = 2 (about 10 of
them for the autoencoder). Batch sizes are per rank (the global batch is P times larger).
MNIST-1D tasks: batch 50, budgets 40 (MLP) / 20 (ResNet-1D) epochs, grids heavy ball [0.03, 0.1, 0.3] and Adam
[1e-3, 3e-3, 1e-2]; DHO2 k = 10, α = 0.1, refresh every 320 steps after a 40-step warm-up,
curvature batch 250. Logistic regression (784→10): batch 500, 30 epochs, grids heavy ball
[0.1, 0.3, 1] and Adam [3e-3, 1e-2, 3e-2] (the training loss of this convex problem keeps
falling, and both bases do best at the largest stable rates); DHO2 k = 10, α = 0.01, refresh
every 100 steps after 40, curvature batch 500. Autoencoder (784-512-128-32-128-512-784, 0.94M
parameters): batch 250, 15 epochs (heavy ball needs most of them to leave the initial plateau),
grids heavy ball [0.3, 1, 3] and Adam [3e-4, 1e-3, 3e-3]; DHO2 as for logistic regression with
curvature batch 250. Learning rates are constant and weight decay is 0. Curvature batches are
global (split across the ranks). The tuned settings keep FOSI's clip of the base learning-rate
scale (``c_max`` 3 with heavy ball, 1 with Adam; ``FOSI_C_MAX``).

``--profile long`` runs each task for minutes instead of seconds, so one-off costs (the compile,
tracing) and noise do not decide: budgets of 150 (MLP), 60 (ResNet-1D), 1500 (logistic
regression) and 250 (autoencoder) epochs, and every task judged by the target its tuned base sets
within the budget (accuracy tasks: its best test accuracy less 0.005). Its results go to
``time_to_accuracy_long_p<P>.json`` and the ``bench_time_to_accuracy_long_p<P>`` section, with a
second table: epochs to target, the epoch gain, DHO2's cost per epoch over its base's split into
step, refresh and other (:func:`epoch_split`), and the wall-time speed-up. Logistic regression
runs the heavy-ball pair and the autoencoder the Adam pair there (FOSI's pairing); ``--pairs``
chooses the pairs of every task.

``--dho2 defaults`` is the drop-in check: DHO2 with its constructor defaults (only the curvature
batch is set) at the learning rate tuned for its base, against that base, on every task including
``cnn_mnist5k`` (the small CNN on MNIST-5k); results in ``time_to_accuracy_defaults_p<P>.json``.

Rank 0 prints the table (per pair: the speed-up of DHO2 over its base as the ratio of median
times and the min/median/max of the per-seed ratios; per optimizer: step time and DHO2's refresh
time) and writes ``<output-dir>/time_to_accuracy_p<P>.json`` (the run's command, commit and date
under ``meta``) and ``.png``. ``--report BENCHMARKS.md`` also writes the rendered table between
the ``<!-- BEGIN bench_time_to_accuracy_p<P> -->`` and ``<!-- END bench_time_to_accuracy_p<P> -->``
lines of that file. ``--render-only JSON`` renders an existing results file without training
(with ``--report``: into that file)::

    python benchmarks/bench_time_to_accuracy.py --render-only results/time_to_accuracy_p2.json \
        --report BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tensorflow as tf  # noqa: E402

from benchmarks import common  # noqa: E402
from dho2_tf.distributed.comm import default_comm  # noqa: E402
from dho2_tf.training.experiment import TrainConfig, train  # noqa: E402

# Every optimizer of a task shares these (model, data, per-rank batch, epoch budget, target).
# A task with ``target_accuracy`` is judged on test accuracy, one without on the training loss.
TASKS: dict[str, dict[str, Any]] = {
    "mlp_mnist1d": {"model": "mlp", "dataset": "mnist1d", "num_samples": 5000,
                    "batch_size": 50, "epochs": 40, "target_accuracy": 0.60},
    "resnet1d_mnist1d": {"model": "resnet1d", "dataset": "mnist1d", "num_samples": 5000,
                         "batch_size": 50, "epochs": 20, "target_accuracy": 0.95},
    "logreg_mnist5k": {"model": "logreg", "dataset": "mnist5k", "num_samples": 5000,
                       "batch_size": 500, "epochs": 30},
    "autoencoder_mnist5k": {"model": "autoencoder", "dataset": "mnist5k", "num_samples": 5000,
                            "batch_size": 250, "epochs": 15},
    "cnn_mnist5k": {"model": "cnn", "dataset": "mnist5k", "num_samples": 5000,
                    "batch_size": 50, "epochs": 10, "target_accuracy": 0.95},
}
COMMON = {"schedule": "constant", "weight_decay": 0.0, "verbose": 0}
# DHO2 settings per task (both DHO2 methods).
DHO2_MNIST5K = {"k": 10, "alpha": 0.01, "refresh_every": 100, "warmup": 40}
DHO2_TASK: dict[str, dict[str, Any]] = {
    "mlp_mnist1d": {"k": 10, "alpha": 0.1, "refresh_every": 320, "warmup": 40,
                    "curvature_batch": 250},
    "resnet1d_mnist1d": {"k": 10, "alpha": 0.1, "refresh_every": 320, "warmup": 40,
                         "curvature_batch": 250},
    "logreg_mnist5k": {**DHO2_MNIST5K, "curvature_batch": 500},
    "autoencoder_mnist5k": {**DHO2_MNIST5K, "curvature_batch": 250},
    "cnn_mnist5k": {"k": 10, "alpha": 0.1, "refresh_every": 320, "warmup": 40,
                    "curvature_batch": 250},
}
# FOSI's clip of the base learning-rate scale, per pair, in the tuned settings (DHO2's default,
# which the drop-in check uses, is 1).
FOSI_C_MAX = {"momentum": 3.0, "adam": 1.0}
# Tasks of the default run (the CNN is a drop-in task: ``--dho2 defaults --tasks ...``).
DEFAULT_TASKS = ["mlp_mnist1d", "resnet1d_mnist1d", "logreg_mnist5k", "autoencoder_mnist5k"]
# ``--dho2``: "tuned" uses DHO2_TASK and sweeps DHO2's own rate; "defaults" is the drop-in check:
# DHO2 with its constructor defaults (only the curvature batch set) at its base's tuned rate.
DHO2_SETTINGS = ("tuned", "defaults")
# Learning-rate grids per pair (the base's name), with per-task overrides.
GRIDS: dict[str, dict[str, list[float]]] = {
    "momentum": {"default": [0.03, 0.1, 0.3], "logreg_mnist5k": [0.1, 0.3, 1.0],
                 "autoencoder_mnist5k": [0.3, 1.0, 3.0]},
    "adam": {"default": [1e-3, 3e-3, 1e-2], "logreg_mnist5k": [3e-3, 1e-2, 3e-2],
             "autoencoder_mnist5k": [3e-4, 1e-3, 3e-3]},
}
# Method → optimizer settings and its pair (the base optimizer's name).
METHODS: dict[str, dict[str, Any]] = {
    "dho2_momentum": {"settings": {"optimizer": "dho2", "base": "momentum", "momentum": 0.9},
                      "pair": "momentum"},
    "momentum": {"settings": {"optimizer": "momentum", "momentum": 0.9}, "pair": "momentum"},
    "dho2_adam": {"settings": {"optimizer": "dho2", "base": "adam"}, "pair": "adam"},
    "adam": {"settings": {"optimizer": "adam"}, "pair": "adam"},
}
PAIRS = {"momentum": ("dho2_momentum", "momentum"), "adam": ("dho2_adam", "adam")}  # (dho2, base)
# The long profile: budgets long enough that one-off costs (compile, tracing) and noise do not
# decide (a base run of the whole budget lasts a minute or more at P = 1), and every task judged
# by the target its tuned base sets: its best metric within the budget (test accuracy less
# ACCURACY_MARGIN, so a one-epoch spike does not set it).
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "short": {},
    "long": {"mlp_mnist1d": {"epochs": 150}, "resnet1d_mnist1d": {"epochs": 60},
             "logreg_mnist5k": {"epochs": 1500}, "autoencoder_mnist5k": {"epochs": 250}},
}
# The pairs a task runs unless --pairs names them: FOSI's pairing on the MNIST-5k tasks in the
# long profile (heavy ball on logistic regression, Adam on the autoencoder), else both.
PROFILE_PAIRS = {"long": {"logreg_mnist5k": ["momentum"], "autoencoder_mnist5k": ["adam"]}}
ACCURACY_MARGIN = 0.005
SWEEP_SEED = 100
QUICK = {"num_samples": 1000, "epochs": 2}
QUICK_ACCURACY = 0.2
QUICK_MAX_BATCH = 100  # 800 training rows: every rank still gets several batches per epoch
QUICK_DHO2 = {"refresh_every": 6, "warmup": 4, "k": 4}  # a refresh happens in the smoke run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: no sweep (middle rate of each grid), 1 seed, 2 epochs, "
                             "1000 samples, per-rank batch <= 100")
    parser.add_argument("--seeds", type=int, default=3, help="measurement seeds (default 3)")
    parser.add_argument("--profile", choices=list(PROFILES), default="short",
                        help="short: the budgets above; long: minute-long base runs, every "
                             "target set by the tuned base (default short)")
    parser.add_argument("--pairs", nargs="+", choices=list(PAIRS), default=None,
                        help="optimizer pairs to run (default: both, or the profile's pair "
                             "of the task: PROFILE_PAIRS)")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=DEFAULT_TASKS,
                        help=f"tasks to run (default: {' '.join(DEFAULT_TASKS)})")
    parser.add_argument("--dho2", choices=DHO2_SETTINGS, default="tuned",
                        help="tuned: DHO2's per-task settings and its own rate sweep; defaults: "
                             "DHO2's constructor defaults at its base's tuned rate (default "
                             "tuned)")
    parser.add_argument("--output-dir", default="results",
                        help="folder for time_to_accuracy_p<P>.json and .png (default results/)")
    common.add_report_arguments(parser, "bench_time_to_accuracy_p<P>", "no training")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be a positive integer. Received: {args.seeds}")
    return args


def is_loss_task(task: dict[str, Any]) -> bool:
    """Whether the task is judged on the training loss (no accuracy target)."""
    return task.get("target_accuracy") is None and not task.get("accuracy_from_base")


def base_sets_target(task: dict[str, Any]) -> bool:
    """Whether the tuned base's best metric within the budget is the target (loss tasks and
    every task of the long profile) rather than a fixed accuracy."""
    return task.get("target_accuracy") is None


def task_settings(task: str, quick: bool, profile: str = "short") -> dict[str, Any]:
    """The shared settings of ``task`` in ``profile`` (shrunk for ``--quick``)."""
    settings = {**COMMON, **TASKS[task], **PROFILES[profile].get(task, {})}
    if profile == "long" and settings.get("target_accuracy") is not None:
        settings.pop("target_accuracy")
        settings["accuracy_from_base"] = True
    if not quick:
        return settings
    settings.update(QUICK, batch_size=min(settings["batch_size"], QUICK_MAX_BATCH))
    if settings.get("target_accuracy") is not None:
        settings["target_accuracy"] = QUICK_ACCURACY
    return settings


def learning_rates(method: str, task: str) -> list[float]:
    """The grid ``method`` sweeps on ``task`` (the same for both members of a pair)."""
    grids = GRIDS[METHODS[method]["pair"]]
    return grids.get(task, grids["default"])


def run_one(name: str, task: dict[str, Any], method: str, lr: float, seed: int,
            quick: bool = False, target: float | None = None,
            dho2: str = "tuned") -> dict[str, Any]:
    """Train once; the record keeps the curve, the target it ran for and DHO2's refresh times.

    Where the base sets the target (:func:`base_sets_target`), ``target=None`` makes the run's
    own best metric its target (a base run of the whole budget: its time is that of its first
    epoch at that target; on accuracy the best less ``ACCURACY_MARGIN``); otherwise the run stops
    at the first epoch that meets ``target`` (a non-finite target is never reached). Tasks with
    a fixed accuracy target use it.
    """
    settings = dict(METHODS[method]["settings"])
    if settings["optimizer"] == "dho2":
        settings.update(dho2_settings(name, dho2), **(QUICK_DHO2 if quick else {}))
        if dho2 == "tuned":
            settings["c_max"] = FOSI_C_MAX[METHODS[method]["pair"]]
    loss_task, from_base = is_loss_task(task), base_sets_target(task)
    finite = target is not None and math.isfinite(target)
    stop = {} if not (from_base and finite) else (
        {"target_loss": target} if loss_task else {"target_accuracy": target})
    fields = {key: value for key, value in task.items() if key != "accuracy_from_base"}
    config = TrainConfig.from_dict({**fields, **stop, **settings, "learning_rate": lr,
                                    "seed": seed})
    try:
        result = train(config)
    except tf.errors.InvalidArgumentError as err:
        if "max_consecutive_skips" not in str(err):
            raise
        # DHO2 stopped a diverged run (every rank at the same step): a miss, not a crash.
        return diverged_record(task, method, lr, seed, target)
    refresh = sum(r["seconds"] for r in result.refreshes)
    epochs_run = len(result.history)
    steps = epochs_run * result.steps_per_epoch
    record = {"method": method, "learning_rate": lr, "seed": seed,
              "time_to_target": result.time_to_target, "best_accuracy": result.best_accuracy,
              "best_train_loss": result.best_train_loss, "train_seconds": result.train_seconds,
              "epochs": epochs_run, "steps": steps, "steps_per_epoch": result.steps_per_epoch,
              "refresh_seconds": refresh, "refreshes": len(result.refreshes),
              "compile_seconds": result.compile_seconds,
              "step_seconds": (result.train_seconds - refresh - result.compile_seconds)
              / max(steps, 1)}
    column = "train_loss" if loss_task else "test_accuracy"
    record["curve"] = [(row["seconds"], row[column]) for row in result.history]
    if not from_base:
        record["epochs_to_target"] = next(
            (i + 1 for i, row in enumerate(result.history)
             if row["test_accuracy"] >= task["target_accuracy"]), None)
        return record
    if target is None:
        target = (result.best_train_loss if loss_task
                  else result.best_accuracy - ACCURACY_MARGIN)
    reached = [i for i, row in enumerate(result.history)
               if (row[column] <= target if loss_task else row[column] >= target)]
    record["time_to_target"] = (result.history[reached[0]]["seconds"]
                                if reached and math.isfinite(target) else None)
    record["epochs_to_target"] = reached[0] + 1 if record["time_to_target"] is not None else None
    record["target_loss" if loss_task else "target_accuracy"] = target
    return record


def dho2_settings(name: str, dho2: str) -> dict[str, Any]:
    """DHO2's settings on task ``name``: the tuned ones, or only the curvature batch (the
    training configuration leaves every other DHO2 hyper-parameter at DHO2's default)."""
    if dho2 == "defaults":
        return {"curvature_batch": DHO2_TASK[name]["curvature_batch"]}
    return DHO2_TASK[name]


def diverged_record(task: dict[str, Any], method: str, lr: float, seed: int,
                    target: float | None) -> dict[str, Any]:
    """The record of a run DHO2 stopped because its steps kept being non-finite: it never
    reaches the target and has no step time."""
    record: dict[str, Any] = {
        "method": method, "learning_rate": lr, "seed": seed, "time_to_target": None,
        "best_accuracy": 0.0, "best_train_loss": float("inf"), "train_seconds": None,
        "epochs": 0, "steps": 0, "refresh_seconds": 0.0, "refreshes": 0,
        "compile_seconds": 0.0, "step_seconds": None, "diverged": True, "curve": [],
        "epochs_to_target": None, "steps_per_epoch": 0}
    if base_sets_target(task):
        key = "target_loss" if is_loss_task(task) else "target_accuracy"
        record[key] = (float("inf") if is_loss_task(task) else float("nan")) \
            if target is None else target
    return record


def median_of(values: Any) -> float:
    """Median of the values that are not ``None`` (NaN when there are none)."""
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else float("nan")


def sweep_key(record: dict[str, Any]) -> tuple[float, float]:
    """Sort key: reached the target sooner, then the better best metric."""
    ttt = record["time_to_target"]
    best = record["best_train_loss"] if "target_loss" in record else -record["best_accuracy"]
    return (float("inf") if ttt is None else ttt, best if math.isfinite(best) else float("inf"))


def best_metric_key(record: dict[str, Any]) -> float:
    """Sort key of a base optimizer's sweep where it sets the target: lowest training loss, or
    highest test accuracy."""
    best = record["best_train_loss"] if "target_loss" in record else -record["best_accuracy"]
    return best if math.isfinite(best) else float("inf")


def log(comm: Any, message: str) -> None:
    """Progress line on rank 0."""
    if comm.is_root:
        print(message, flush=True)


def describe(record: dict[str, Any]) -> str:
    """One progress line for a finished run."""
    ttt = record["time_to_target"]
    if "target_loss" in record:
        best = f"best_loss={record['best_train_loss']:.4f} target={record['target_loss']:.4f}"
    elif "target_accuracy" in record:
        best = f"best={record['best_accuracy']:.3f} target={record['target_accuracy']:.3f}"
    else:
        best = f"best={record['best_accuracy']:.3f}"
    return (f"  {record['method']:<13} lr={record['learning_rate']:<7g} seed={record['seed']:<4}"
            f" time_to_target={'miss' if ttt is None else f'{ttt:.1f}s':<7} {best}"
            f" epochs={record['epochs']} to_target={record.get('epochs_to_target')}"
            f" refresh={record['refresh_seconds']:.1f}s"
            + (" diverged (DHO2 stopped it)" if record.get("diverged") else ""))


def target_of(record: dict[str, Any]) -> float:
    """The target a base run set (its best loss, or its best accuracy less the margin)."""
    return record["target_loss"] if "target_loss" in record else record["target_accuracy"]


def sweep_fixed_target(name: str, task: dict[str, Any], pairs: list[str], comm: Any,
                       dho2: str = "tuned"
                       ) -> tuple[dict[str, float], dict[str, list[dict[str, Any]]]]:
    """Each method's rate with the shortest time to the fixed accuracy target (sweep seed);
    with ``dho2="defaults"`` DHO2 takes its base's rate."""
    sweep: dict[str, list[dict[str, Any]]] = {}
    chosen: dict[str, float] = {}
    for pair in pairs:
        for method in PAIRS[pair][::-1]:   # the base first
            sweep[method] = []
            if dho2 == "defaults" and method == PAIRS[pair][0]:
                chosen[method] = chosen[PAIRS[pair][1]]
                continue
            for lr in learning_rates(method, name):
                sweep[method].append(run_one(name, task, method, lr, SWEEP_SEED, dho2=dho2))
                log(comm, "sweep" + describe(sweep[method][-1]))
            chosen[method] = min(sweep[method], key=sweep_key)["learning_rate"]
    return chosen, sweep


def sweep_base_target(name: str, task: dict[str, Any], pairs: list[str], comm: Any,
                      dho2_mode: str = "tuned"
                      ) -> tuple[dict[str, float], dict[str, list[dict[str, Any]]]]:
    """Per pair: the base's rate with the best metric within the budget, then the DHO2 rate with
    the shortest time to the target that run sets (FOSI's protocol); with
    ``dho2_mode="defaults"`` DHO2 takes its base's rate."""
    sweep: dict[str, list[dict[str, Any]]] = {}
    chosen: dict[str, float] = {}
    for pair in pairs:
        dho2, base = PAIRS[pair]
        sweep[base] = []
        for lr in learning_rates(base, name):
            sweep[base].append(run_one(name, task, base, lr, SWEEP_SEED))
            log(comm, "sweep" + describe(sweep[base][-1]))
        tuned = min(sweep[base], key=best_metric_key)
        chosen[base] = tuned["learning_rate"]
        sweep[dho2] = []
        if dho2_mode == "defaults":
            chosen[dho2] = chosen[base]
            continue
        for lr in learning_rates(dho2, name):
            sweep[dho2].append(run_one(name, task, dho2, lr, SWEEP_SEED,
                                       target=target_of(tuned)))
            log(comm, "sweep" + describe(sweep[dho2][-1]))
        chosen[dho2] = min(sweep[dho2], key=sweep_key)["learning_rate"]
    return chosen, sweep


def methods_of(pairs: list[str]) -> list[str]:
    """The methods of ``pairs``, in METHODS order."""
    wanted = {m for pair in pairs for m in PAIRS[pair]}
    return [m for m in METHODS if m in wanted]


def measure(name: str, task: dict[str, Any], chosen: dict[str, float], seed: int,
            quick: bool, pairs: list[str], dho2_mode: str = "tuned"
            ) -> dict[str, dict[str, Any]]:
    """One run of every method on ``seed``; where the base sets the target each base runs
    before its DHO2."""
    if not base_sets_target(task):
        return {m: run_one(name, task, m, chosen[m], seed, quick, dho2=dho2_mode)
                for m in methods_of(pairs)}
    records: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        dho2, base = PAIRS[pair]
        records[base] = run_one(name, task, base, chosen[base], seed, quick)
        records[dho2] = run_one(name, task, dho2, chosen[dho2], seed, quick,
                                target=target_of(records[base]), dho2=dho2_mode)
    return {m: records[m] for m in methods_of(pairs)}


def run_task(name: str, args: argparse.Namespace, comm: Any) -> dict[str, Any]:
    """Sweep, then measure every method on the seeds."""
    task = task_settings(name, args.quick, args.profile)
    pairs = list(args.pairs or PROFILE_PAIRS.get(args.profile, {}).get(name, PAIRS))
    methods = methods_of(pairs)
    log(comm, f"== {name}: {task}")
    if args.quick:
        chosen = {m: learning_rates(m, name)[len(learning_rates(m, name)) // 2]
                  for m in methods}
        sweep: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    else:
        chosen, sweep = (sweep_base_target if base_sets_target(task)
                         else sweep_fixed_target)(name, task, pairs, comm, args.dho2)
        # Times differ between ranks: every rank must train with rank 0's choice.
        chosen = comm.broadcast_object(chosen, 0, name=f"bench/{name}/chosen")
    log(comm, f"   chosen learning rates: {chosen}")
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for seed in range(1 if args.quick else args.seeds):  # methods interleaved per seed
        for method, record in measure(name, task, chosen, seed, args.quick, pairs,
                                      args.dho2).items():
            runs[method].append(record)
            log(comm, "run  " + describe(record))
    return {"task": task, "metric": "train_loss" if is_loss_task(task) else "test_accuracy",
            "profile": args.profile, "pairs": pairs, "dho2": args.dho2,
            "learning_rate_grids": {m: learning_rates(m, name) for m in methods},
            "dho2_settings": dho2_settings(name, args.dho2), "chosen_learning_rates": chosen, "sweep": sweep,
            "runs": runs, "summary": summarize(runs)}


def ratio(base: float, dho2: float) -> float:
    """Speed-up ``base / dho2`` of two times (``inf`` for a miss): 0 if DHO2 missed, inf if only
    the base missed, NaN if both did."""
    if math.isinf(dho2):
        return float("nan") if math.isinf(base) else 0.0
    return base / dho2 if dho2 > 0 else float("nan")


def epoch_split(dho2: list[dict[str, Any]], base: list[dict[str, Any]]) -> dict[str, Any]:
    """DHO2's cost per epoch to the target over its base's, split into step / refresh / other.

    Math, per seed (median over seeds), with t the time to target, E the epochs to it, s the
    steady step time, S the steps per epoch and R the refresh time of the run::

        ratio = (t_D / E_D) / (t_B / E_B)
        step = s_D·S / (t_B / E_B),  refresh = (R_D / E_D) / (t_B / E_B),
        other = ratio − step − refresh     (compile, tracing, the epoch's last partial work)

    and the epoch gain E_B / E_D, so that speed-up = epoch gain / ratio.
    """
    rows = []
    for d, b in zip(dho2, base):
        if not (d.get("epochs_to_target") and b.get("epochs_to_target")
                and d["time_to_target"] and b["time_to_target"]):
            continue
        base_epoch = b["time_to_target"] / b["epochs_to_target"]
        ratio_ = d["time_to_target"] / d["epochs_to_target"] / base_epoch
        step = d["step_seconds"] * d["steps_per_epoch"] / base_epoch
        refresh = d["refresh_seconds"] / d["epochs_to_target"] / base_epoch
        rows.append({"epoch_gain": b["epochs_to_target"] / d["epochs_to_target"],
                     "epoch_cost_ratio": ratio_, "step": step, "refresh": refresh,
                     "other": ratio_ - step - refresh})
    if not rows:
        return {}
    return {key: statistics.median(row[key] for row in rows) for key in rows[0]}


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Median and range of the time to target per method, and DHO2's speed-up per pair."""
    out: dict[str, Any] = {}
    padded: dict[str, list[float]] = {}
    for method, records in runs.items():
        padded[method] = [float("inf") if r["time_to_target"] is None else r["time_to_target"]
                          for r in records]
        times = padded[method]
        out[method] = {"median": statistics.median(times), "min": min(times), "max": max(times),
                       "reached": sum(math.isfinite(t) for t in times), "seeds": len(times),
                       "step_seconds": median_of(r["step_seconds"] for r in records),
                       "refresh_seconds": statistics.median(r["refresh_seconds"]
                                                            for r in records),
                       "refreshes": statistics.median(r["refreshes"] for r in records),
                       "compile_seconds": statistics.median(r.get("compile_seconds", 0.0)
                                                            for r in records),
                       "epochs_to_target": median_of(r.get("epochs_to_target")
                                                     for r in records),
                       "best_accuracy": statistics.median(r["best_accuracy"] for r in records),
                       "best_train_loss": statistics.median(r["best_train_loss"]
                                                            for r in records)}
        for key in ("target_loss", "target_accuracy"):
            if key in records[0]:
                out[method][key] = statistics.median(r[key] for r in records)
    out["pairs"] = {}
    for pair, (dho2, base) in PAIRS.items():
        if dho2 not in runs:
            continue
        per_seed = [ratio(b, d) for b, d in zip(padded[base], padded[dho2])]
        known = sorted(r for r in per_seed if not math.isnan(r))
        of_medians = ratio(out[base]["median"], out[dho2]["median"])
        out["pairs"][pair] = {
            "dho2": dho2, "base": base, "per_seed": per_seed,
            "speedup_of_medians": None if math.isnan(of_medians) else of_medians,
            "per_seed_min": known[0] if known else None,
            "per_seed_median": statistics.median(known) if known else None,
            "per_seed_max": known[-1] if known else None,
            "epoch_split": epoch_split(runs[dho2], runs[base])}
    return out


def fmt_seconds(value: float) -> str:
    """Seconds, or 'miss' when the target was not reached."""
    return "miss" if value == float("inf") else f"{value:.1f}"


def fmt_ratio(value: float | None) -> str:
    """A speed-up such as '1.35x' ('n/a' when undefined)."""
    return "n/a" if value is None else "inf" if math.isinf(value) else f"{value:.2f}x"


def fmt_target(res: dict[str, Any], method: str) -> str:
    """The target of ``method``'s runs: the accuracy, or the (median per-seed) target the base
    set."""
    summary = res["summary"][method]
    if "target_loss" in summary:
        return f"loss {summary['target_loss']:.4f}"
    if "target_accuracy" in summary:
        return f"acc {summary['target_accuracy']:.3f}"
    return f"acc {res['task']['target_accuracy']:.2f}"


def table(results: dict[str, Any]) -> str:
    """Markdown table of all tasks with the speed-up per pair."""
    lines = ["| task | target | optimizer | lr | time to target (s), median [min, max] | reached "
             "| best (median) | step time (ms) | refresh total (s) | speed-up of DHO2 over its "
             "base: ratio of medians; per seed min / median / max |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        summary = res["summary"]
        for method in (m for m in METHODS if m in summary):
            s = summary[method]
            pair = summary["pairs"][METHODS[method]["pair"]]
            speedup = "" if method != pair["dho2"] else (
                f"{fmt_ratio(pair['speedup_of_medians'])} vs {pair['base']}; "
                f"{fmt_ratio(pair['per_seed_min'])} / {fmt_ratio(pair['per_seed_median'])} / "
                f"{fmt_ratio(pair['per_seed_max'])}")
            best = f"loss {s['best_train_loss']:.4f}" if res["metric"] == "train_loss" \
                else f"acc {s['best_accuracy']:.3f}"
            lines.append(
                f"| {name} | {fmt_target(res, method)} | {method} | "
                f"{res['chosen_learning_rates'][method]:g} | "
                f"{fmt_seconds(s['median'])} [{fmt_seconds(s['min'])}, {fmt_seconds(s['max'])}]"
                f" | {s['reached']}/{s['seeds']} | {best} | {1e3 * s['step_seconds']:.1f} | "
                f"{s['refresh_seconds']:.1f} | {speedup} |")
    return "\n".join(lines)


def split_table(results: dict[str, Any]) -> str:
    """Markdown table: epochs to target, DHO2's epoch cost split, and the wall-time ratio."""
    lines = ["| task | pair | epochs to target, base / DHO2 (median) | epoch gain | DHO2 epoch "
             "cost / base epoch: total = step + refresh + other | wall-time speed-up (ratio of "
             "medians) |", "|---|---|---|---|---|---|"]
    for name, res in results.items():
        summary = res["summary"]
        for pair_name, pair in summary["pairs"].items():
            split = pair.get("epoch_split") or {}
            d, b = summary[pair["dho2"]], summary[pair["base"]]
            epochs = (f"{b.get('epochs_to_target', math.nan):.0f} / "
                      f"{d.get('epochs_to_target', math.nan):.0f}")
            if not split:
                lines.append(f"| {name} | {pair_name} | {epochs} | n/a | n/a | "
                             f"{fmt_ratio(pair['speedup_of_medians'])} |")
                continue
            lines.append(
                f"| {name} | {pair_name} | {epochs} | {split['epoch_gain']:.2f}x | "
                f"{split['epoch_cost_ratio']:.2f} = {split['step']:.2f} + "
                f"{split['refresh']:.2f} + {split['other']:.2f} | "
                f"{fmt_ratio(pair['speedup_of_medians'])} |")
    return "\n".join(lines)


def notes(results: dict[str, Any]) -> list[str]:
    """Where DHO2's time goes, one line per task and pair."""
    out = []
    for name, res in results.items():
        summary = res["summary"]
        for pair in summary["pairs"].values():
            d, b = summary[pair["dho2"]], summary[pair["base"]]
            out.append(
                f"{name}: {pair['dho2']} time goes to {d['refreshes']:.0f} curvature refreshes "
                f"totalling {d['refresh_seconds']:.1f}s (median per run), a one-off compile of "
                f"{d['compile_seconds']:.1f}s and steps of "
                f"{1e3 * d['step_seconds']:.1f} ms vs {1e3 * b['step_seconds']:.1f} ms for "
                f"{pair['base']} ({d['step_seconds'] / b['step_seconds']:.2f}x per step).")
    return out


def render(payload: dict[str, Any], results: str) -> str:
    """The report section of a results file (``results``: its path as shown in the text)."""
    lines = common.provenance_lines(payload.get("meta"), results, payload.get("wall_seconds"))
    where = [f"- {line}" for line in notes(payload["results"])]
    return "\n".join([*lines, "", table(payload["results"]), "",
                      split_table(payload["results"]), "", *where]) + "\n"


def plot(results: dict[str, Any], path: str) -> None:
    """Target metric vs training wall time, one panel per task, one colour per optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    colors = {"dho2_momentum": "tab:red", "momentum": "tab:green", "dho2_adam": "tab:purple",
              "adam": "tab:blue"}
    for ax, (name, res) in zip(axes[0], results.items()):
        loss_task = res["metric"] == "train_loss"
        for method, records in res["runs"].items():
            for i, record in enumerate(records):
                xs, ys = zip(*record["curve"]) if record["curve"] else ((), ())
                ax.plot(xs, ys, color=colors[method], alpha=0.8, marker=".",
                        ls="-" if method.startswith("dho2") else "--",
                        label=f"{method} (lr {record['learning_rate']:g})" if i == 0 else None)
        for pair in res["summary"]["pairs"].values():
            base = res["summary"][pair["base"]]
            target = base.get("target_loss", base.get("target_accuracy"))
            if target is not None:
                ax.axhline(target, color=colors[pair["base"]], ls=":", lw=1,
                           label=f"target ({pair['base']} pair, median)")
        if loss_task:
            ax.set_yscale("log")
        elif res["task"].get("target_accuracy") is not None:
            ax.axhline(res["task"]["target_accuracy"], color="grey", ls="--", lw=1,
                       label="target")
        ax.set(title=name, xlabel="training wall time (s), evaluation excluded",
               ylabel="training loss (full set)" if loss_task else "test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right" if loss_task else "lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(path: str, payload: dict[str, Any], args: argparse.Namespace) -> None:
    """Write ``path``.json and .png (rank 0), then the section into ``--report`` if given."""
    common.save_results(path + ".json", payload)
    plot(payload["results"], path + ".png")
    print(f"wrote {path}.json and {path}.png", flush=True)
    common.publish(path + ".json", render, args.report)


def results_stem(profile: str, world_size: int, dho2: str = "tuned") -> str:
    """``time_to_accuracy[_long][_defaults]_p<P>``: the short or long profile, DHO2 tuned or
    at its defaults."""
    return (f"time_to_accuracy{'' if profile == 'short' else '_' + profile}"
            f"{'' if dho2 == 'tuned' else '_' + dho2}_p{world_size}")


def main(argv: list[str] | None = None) -> int:
    """Run every task and write the results on rank 0 (``--render-only``: only render a
    results file)."""
    args = parse_args(argv)
    if args.render_only:
        common.publish(args.render_only, render, args.report, show=True)
        return 0
    typed = None if argv is None else [common.display_path(__file__), *argv]
    comm = default_comm()
    logging.basicConfig(level=logging.WARNING)
    if args.report and comm.is_root:
        stem = results_stem(args.profile, comm.size, args.dho2)
        common.check_report(args.report, f"{stem}.json")
    # Read before any result file is written (that would mark the tree dirty).
    meta = common.run_metadata(typed, launcher=common.horovod_launcher()) if comm.is_root else {}
    started, load_start = time.perf_counter(), os.getloadavg()
    train(TrainConfig.from_dict({**task_settings("mlp_mnist1d", True), "epochs": 1,
                                 "optimizer": "adam", "learning_rate": 1e-3}))  # warm TensorFlow up
    results = {name: run_task(name, args, comm) for name in args.tasks}
    wall = time.perf_counter() - started
    if comm.is_root:
        text = table(results)
        print("\n" + "\n".join([text, "", split_table(results), "", *notes(results)])
              + f"\n\nbenchmark wall time: {wall:.0f}s at P={comm.size}; load "
              f"average (1/5/15 min) at start {load_start}, at end {os.getloadavg()}", flush=True)
        os.makedirs(args.output_dir, exist_ok=True)
        payload = {"meta": meta, "machine": common.machine(comm.size),
                   "launcher": "horovodrun" if "HOROVOD_RANK" in os.environ else "python",
                   "world_size": comm.size, "quick": args.quick, "profile": args.profile,
                   "wall_seconds": wall,
                   "load_average_1_5_15min": {"start": load_start, "end": os.getloadavg()},
                   "methods": METHODS, "results": results, "table": text}
        stem = results_stem(args.profile, comm.size, args.dho2)
        write_results(os.path.join(args.output_dir, stem), payload, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
