"""Benchmark: prioritized SGD vs mini-batch SGD, wall-clock time to a target test accuracy.

Long runs (the default; several hours on 2 CPU cores, run on a quiet machine)::

    python benchmarks/bench_prioritized.py --out BENCHMARKS.md

launches ``horovodrun --gloo -np P`` for P = 1 and 2 and runs, per task and model (``--tasks``,
``--models``; default the MNIST 5,000-image subset with the MLP and the small CNN, MNIST-1D with
each easy training example repeated 4 times, and MNIST-1D with 20% of the training labels
replaced by another class, both with the MLP; ``--num-samples`` MNIST-1D examples):

1. **Targets** (``--calibrate-seconds`` T, default 30): one calibration run of SGD at the
   equal-work batch (P = 1, seed 0, ``--lr``) for ``--calibrate-budget`` seconds; the target is
   the lowest test accuracy it first reaches at ≥ T s (``bench.calibrated_target``), so base
   runs last about T s or more and one-off costs (tracing excluded, the initial priority pass
   included) do not decide. ``--calibrate-seconds 0`` uses ``--target`` instead.
2. **Learning rates** tuned at the first P of ``--ranks`` with seed 0 on the same grid
   ``--lr-grid`` for every method and for SGD at every swept batch (``--sweep`` plus the
   equal-work batch (k + r)·n); the other P reuse them. ``--lr-grid ""`` uses ``--lr``.
3. **Seeds** (``--seeds``, default 0, 1, 2): every method, SGD at the equal-work batch and SGD
   at its best swept batch.

The report gives the median time to target and the speed-up over both SGD baselines, and the
cost split: light and full steps and their mean in-graph times, so that the bookkeeping's share
(scores, priority scatter, τ) of the clock shows next to the step's. Methods (``--methods``):
``psgd-default`` (``PrioritizedSampler()``, the recommended configuration), ``psgd`` (the
paper's released configuration, ``PrioritizedSampler.paper()``), and optionally the unbiased
and pool variants of ``bench.PSGD_VARIANTS``. SGD with momentum 0.9 for all.

A quick functional check (seconds; no timing value)::

    python benchmarks/bench_prioritized.py --tasks mnist1d --models mlp --ranks 1 --seeds 0 \
        --methods psgd-default --sweep 64 --lr-grid 0.1 --calibrate-seconds 1 \
        --calibrate-budget 2 --budget mnist1d/mlp=2 --num-samples 1000 --rows /tmp/b.json

Protocol: see :mod:`benchmarks.prioritized.harness`; the report:
:mod:`benchmarks.prioritized.rendering`.

Every run is saved with the run's command, commit and date (``meta``), the targets, budgets,
calibration curves and tuning runs to ``--rows`` (default ``results/bench_prioritized.json``).
``--out`` (alias ``--report``) replaces only the text between the
``<!-- BEGIN bench_prioritized -->`` and ``<!-- END bench_prioritized -->`` lines of that file
(the section is named after the results file, see :func:`benchmarks.common.section_name`).
``--from-rows`` (alias ``--render-only``) renders a saved results file without running
anything::

    python benchmarks/bench_prioritized.py --render-only results/bench_prioritized.json \
        --report BENCHMARKS.md

A results file in the older format (a bare list of rows) renders with the targets and budgets
of the command line and without provenance.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

REPO = common.REPO

# Tuned once per model and method (P = 1, seed 0, MNIST-1D) on 2–5 point grids within
# {0.02, 0.05, 0.1, 0.2, 0.4}; psgd-default, psgd-is-free and psgd-pool on {0.05, 0.1, 0.2, 0.4}
# (time to target in s, "miss" = not within the budget):
#   psgd-default  mlp 0.93 / 1.02 / miss / miss   cnn 1.18 / 1.21 / 0.56 / miss   (γ = 0.1)
#   psgd-default  mlp    – / 0.50 / 0.45 / miss   cnn    – / 0.89 / 0.66 / miss   (γ = 0.5, now)
#   psgd-is-free  mlp 0.80 / 3.09 / miss / miss   cnn 1.81 / 0.73 / 0.48 / miss
#   psgd-pool     mlp 1.64 / 1.05 / 0.83 / 0.44   cnn 1.78 / 1.03 / 1.31 / miss
# MNIST-5k CNN: SGD at 0.2 stalls (best test accuracy 0.54 in 25 s); 0.05 and 0.1 reach 0.978
# and 0.975 in 15 s (P = 1, seed 0), so every method uses 0.05 on that task.
# Keys "model/method" apply to every task; "task/model/method" overrides one task.
DEFAULT_LR = ("mlp/sgd=0.2,mlp/psgd=0.02,mlp/psgd+a=0.05,mlp/psgd-is=0.05,mlp/psgd-is-ll=0.05,"
              "mlp/psgd-default=0.2,mlp/psgd-is-free=0.05,mlp/psgd-pool=0.4,"
              "cnn/sgd=0.2,cnn/psgd=0.1,cnn/psgd+a=0.1,cnn/psgd-is=0.2,cnn/psgd-is-ll=0.1,"
              "cnn/psgd-default=0.2,cnn/psgd-is-free=0.2,cnn/psgd-pool=0.1,"
              + ",".join(f"mnist5k/cnn/{m}=0.05" for m in
                         ("sgd", "psgd", "psgd+a", "psgd-is", "psgd-is-ll", "psgd-default",
                          "psgd-is-free", "psgd-pool")))
# Fallback targets (--calibrate-seconds 0), per task/model. MNIST-5k: SGD's best test accuracy within 10–15 s (P = 1, seed 0) is 0.954
# (MLP) and 0.978 (CNN); the targets sit below it so that every method can reach them.
DEFAULT_TARGET = ("mnist1d/mlp=0.60,mnist1d/cnn=0.85,mnist1d-redundant/mlp=0.60,"
                  "mnist1d-redundant/cnn=0.85,mnist5k/mlp=0.93,mnist5k/cnn=0.96,"
                  "mnist5k-redundant/mlp=0.93,mnist5k-redundant/cnn=0.96,"
                  "mnist1d-noisy/mlp=0.55,mnist1d-noisy/cnn=0.80,mnist5k-noisy/mlp=0.90,"
                  "mnist5k-noisy/cnn=0.94")
# Clock budget of every run (per model, or per task/model; "@P" keys apply at P ranks): 2.5x
# the 30 s base runs at P = 1. At P = 2 both ranks share the 2 cores and every step waits for a
# latency-bound allreduce, so the same runs take 2-3x longer and get 2.4x the budget.
DEFAULT_BUDGET = "mlp=75,cnn=75,mlp@2=180,cnn@2=180"
RESULTS = "results/bench_prioritized.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", default="1,2", help="comma-separated P values")
    parser.add_argument("--tasks", default="mnist5k/mlp,mnist5k/cnn,mnist1d-redundant/mlp,"
                        "mnist1d-noisy/mlp",
                        help="comma-separated keys of bench.TASKS, each optionally with "
                        "/model (then --models is ignored for it)")
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default="psgd-default,psgd",
                        help="PSGD variants (keys of bench.PSGD_VARIANTS; psgd-default is the "
                        "default of PrioritizedModel, psgd the paper's released configuration)")
    parser.add_argument("--k", type=float, default=0.05)
    parser.add_argument("--r", type=float, default=0.01)
    parser.add_argument("--sweep", default="64,128,512", help="SGD global batches (plus "
                        "the equal-work batch)")
    parser.add_argument("--lr", default=DEFAULT_LR,
                        help="learning rate per model/method (SGD with momentum 0.9)")
    parser.add_argument("--target", default=DEFAULT_TARGET,
                        help="test accuracy per task/model (or per model)")
    parser.add_argument("--budget", default=DEFAULT_BUDGET,
                        help="clock seconds per run, per task/model (or per model); a key "
                        "suffixed @P (e.g. mlp@2=180) applies at P ranks only")
    parser.add_argument("--lr-grid", default="0.05,0.1,0.2,0.4",
                        help="learning rates tried per method and SGD batch at the first P, "
                        "seed 0 ('' = use --lr)")
    parser.add_argument("--calibrate-seconds", type=float, default=30.0,
                        help="targets such that SGD first reaches them after this many clock "
                        "seconds (0 = use --target)")
    parser.add_argument("--calibrate-budget", type=float, default=60.0,
                        help="clock seconds of each calibration run")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--num-samples", type=int, default=20000)
    parser.add_argument("--phase", default="run", choices=("run", "calibrate"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--rows", default=RESULTS,
                        help="results file: every run, with the command, commit and date")
    common.add_report_arguments(parser, "bench_prioritized", "no run",
                                report_flags=("--out", "--report"),
                                render_flags=("--from-rows", "--render-only"))
    parser.add_argument("--worker-json", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tune", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def per_model(text: str) -> dict[str, float]:
    """``"a=1,b=2"`` → ``{"a": 1.0, "b": 2.0}``."""
    return {key: float(value) for key, value in (item.split("=") for item in text.split(","))}


def lookup(table: dict[str, float], *keys: str) -> float:
    """The value of the first of ``keys`` found in ``table`` (KeyError naming them all)."""
    for key in keys:
        if key in table:
            return table[key]
    raise KeyError(f"none of {keys} in {sorted(table)}")


def budget_for(budgets: dict[str, float], label: str, ranks: int) -> float:
    """Clock budget of a run of ``label`` (``task/model``) at P = ``ranks``: the first of the
    keys ``task/model@P``, ``model@P``, ``task/model``, ``model`` in ``budgets``."""
    model = label.split("/")[-1]
    return lookup(budgets, f"{label}@{ranks}", f"{model}@{ranks}", label, model)


def task_models(args: argparse.Namespace) -> list[tuple[str, str]]:
    """``(task, model)`` pairs of ``--tasks`` (``task/model`` entries, or every ``--models``)."""
    pairs = []
    for item in args.tasks.split(","):
        task, _, model = item.partition("/")
        pairs += [(task, model)] if model else [(task, m) for m in args.models.split(",")]
    return pairs


def sgd_lr_key(task: str, model: str, batch: int) -> str:
    """``--lr`` key of SGD's tuned learning rate at one global batch."""
    return f"{task}/{model}/sgd@{batch}"


def worker(args: argparse.Namespace) -> None:
    """Runs under horovodrun: calibration, or the whole plan for this P; rank 0 writes JSON."""
    from benchmarks.prioritized import harness as bench
    from dho2_tf.distributed.comm import default_comm

    common.share_cores_between_ranks()
    comm = default_comm()
    logging.basicConfig(level=logging.INFO if comm.is_root else logging.WARNING,
                        format="%(asctime)s %(message)s")
    log = logging.getLogger("bench_prioritized")
    targets, budgets, lrs = per_model(args.target), per_model(args.budget), per_model(args.lr)
    seeds = [int(s) for s in args.seeds.split(",")]
    grid = [float(v) for v in args.lr_grid.split(",") if v] if args.tune else []
    results, tuning, tuned, calibration = [], [], {}, {}

    def run(spec: "bench.RunSpec", data: Any, keep: list | None = None,
            **kwargs: Any) -> "bench.RunResult":
        label = f"{spec.task}/{spec.model}"
        target = kwargs.pop("target", None) or lookup(targets, label, spec.model)
        budget = kwargs.pop("budget", None) or budget_for(budgets, label, comm.size)
        res = bench.run_once(spec, data, target, budget, args.eval_every, comm, **kwargs)
        log.info("P=%d %s: %s in %s s (%d steps, best %.3f)", comm.size, label,
                 f"{spec.method}/b{spec.batch}/lr{spec.learning_rate}/seed{spec.seed}",
                 res.time_to_target, res.steps, res.best_accuracy)
        (results if keep is None else keep).append(res)
        return res

    def fastest(candidates: dict[Any, "bench.RunResult"]) -> Any:
        return min(candidates, key=lambda c: (candidates[c].time_to_target or float("inf"), c))

    def tune(make: Any, fixed: float, data: Any) -> tuple[float, "bench.RunResult"]:
        """Seed-0 runs on the grid (or at ``fixed``); the best rate and its run (kept)."""
        if not grid:
            return fixed, run(make(fixed), data)
        trials = {lr: run(make(lr), data, keep=tuning) for lr in grid}
        best = fastest(trials)
        results.append(trials[best])
        return best, trials[best]

    for task, model in task_models(args):
        data = bench.load_task(task, args.num_samples)
        label = f"{task}/{model}"
        eq_batch = bench.equal_work_batch(args.k, args.r, len(data.y_train), comm.size)
        base = dict(model=model, method="sgd", seed=seeds[0], task=task)
        if args.phase == "calibrate":
            res = run(bench.RunSpec(batch=eq_batch, learning_rate=lookup(
                lrs, sgd_lr_key(task, model, eq_batch), f"{label}/sgd", f"{model}/sgd"),
                **base), data, keep=[], target=2.0, budget=args.calibrate_budget,
                record_curve=True)
            calibration[label] = {"curve": res.curve, "target": bench.calibrated_target(
                res.curve, args.calibrate_seconds)}
            continue
        sweep = sorted({int(b) for b in args.sweep.split(",")} | {eq_batch})
        first = {}
        for b in sweep:
            fixed = lookup(lrs, sgd_lr_key(task, model, b), f"{label}/sgd", f"{model}/sgd")
            tuned[sgd_lr_key(task, model, b)], first[b] = tune(
                lambda lr, b=b: bench.RunSpec(batch=b, learning_rate=lr, **base), fixed, data)
        best = fastest(first)
        for batch in sorted({eq_batch, best}):
            for seed in seeds[1:]:
                run(bench.RunSpec(**{**base, "batch": batch, "seed": seed,
                                     "learning_rate": tuned[sgd_lr_key(task, model, batch)]}),
                    data)
        for method in args.methods.split(","):
            fixed = lookup(lrs, f"{label}/{method}", f"{model}/{method}")
            lr, _ = tune(lambda lr, m=method: bench.RunSpec(
                model, m, lr, seeds[0], k=args.k, r=args.r, task=task), fixed, data)
            tuned[f"{label}/{method}"] = lr
            for seed in seeds[1:]:
                run(bench.RunSpec(model, method, lr, seed, k=args.k, r=args.r, task=task), data)
        log.info("P=%d %s: equal-work batch %d, best swept batch %d", comm.size, label,
                 eq_batch, best)
    if comm.is_root:
        Path(args.worker_json).write_text(json.dumps(
            {"rows": as_rows(results), "tuning": as_rows(tuning), "tuned_lr": tuned,
             "calibration": calibration}, indent=1))


def as_rows(results: list[Any]) -> list[dict[str, Any]]:
    """Report rows of run results; the report groups rows by "model": label them task/model."""
    return [{**dataclasses.asdict(r.spec), **{f.name: getattr(r, f.name) for f in
             dataclasses.fields(r) if f.name not in ("spec", "curve")},
             "model": f"{r.spec.task}/{r.spec.model}"} for r in results]


OUTPUT_FLAGS = ("--out", "--report", "--rows", "--from-rows", "--render-only")


def run_flags(argv: list[str]) -> list[str]:
    """``argv`` without the output-only flags (``OUTPUT_FLAGS`` and their values)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.split("=")[0] in OUTPUT_FLAGS:
            skip = "=" not in arg
        else:
            kept.append(arg)
    return kept


def launch(args: argparse.Namespace, ranks: int, json_path: Path,
           extra: list[str] = ()) -> dict[str, Any]:
    """Re-run this script under ``horovodrun --gloo -np ranks`` (``extra``: flags that override
    the command line's); returns the worker's JSON."""
    cmd = [*common.horovodrun_prefix(ranks), sys.executable, str(Path(__file__).resolve()),
           *run_flags(sys.argv[1:]), *extra, "--worker-json", str(json_path)]
    subprocess.run(cmd, check=True, cwd=REPO, env=common.worker_environment(ranks))
    return json.loads(json_path.read_text())


def resolved(rows: list[dict[str, Any]], args: argparse.Namespace,
             calibrated: dict[str, float] | None = None) -> dict[str, Any]:
    """Targets (``calibrated`` ones first, then the command line's) and budgets of the command
    line for every task/model label of ``rows``."""
    targets = {**per_model(args.target), **(calibrated or {})}
    budgets = per_model(args.budget)
    labels = {row["model"]: row["model"].split("/")[-1] for row in rows}  # task/model → model
    return {"targets": {k: lookup(targets, k, m) for k, m in labels.items()},
            "budgets": {k: lookup(budgets, k, m) for k, m in labels.items()}}


def load_results(path: str, args: argparse.Namespace) -> dict[str, Any]:
    """A results file as ``{"meta", "targets", "budgets", "rows"}``; a bare list of rows (the
    older format) gets the command line's targets and budgets and no ``meta``."""
    payload = common.load_results(path)
    if isinstance(payload, list):
        return {"meta": None, **resolved(payload, args), "rows": payload}
    return payload


def render(payload: dict[str, Any], results: str) -> str:
    """The report section of a results file (``results``: its path as shown in the text)."""
    from benchmarks.prioritized import rendering

    return rendering.markdown(payload["rows"], payload["targets"], payload["budgets"],
                                       payload["meta"], results,
                                       tuning=payload.get("tuning", []),
                                       calibration=payload.get("calibration", {}))


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Calibration (P = 1), then one ``horovodrun`` worker per P of ``--ranks``: the first
    tunes the learning rates, the others reuse them. Returns ``{"rows", "tuning",
    "calibration", "targets"}`` (``targets``: the calibrated ones, by task/model)."""
    out: dict[str, Any] = {"rows": [], "tuning": [], "calibration": {}, "targets": {}}
    targets = args.target
    with tempfile.TemporaryDirectory() as tmp:
        if args.calibrate_seconds > 0:
            out["calibration"] = launch(args, 1, Path(tmp) / "calibrate.json",
                                        ["--phase", "calibrate"])["calibration"]
            out["targets"] = {label: c["target"] for label, c in out["calibration"].items()
                              if c["target"] is not None}
            targets = ",".join([targets] + [f"{k}={v}" for k, v in out["targets"].items()])
        lr, tune = args.lr, True
        for ranks in [int(p) for p in args.ranks.split(",")]:
            extra = ["--target", targets, "--lr", lr] + (["--tune"] if tune else [])
            part = launch(args, ranks, Path(tmp) / f"np{ranks}.json", extra)
            out["rows"] += part["rows"]
            out["tuning"] += part["tuning"]
            lr = ",".join([lr] + [f"{k}={v}" for k, v in part["tuned_lr"].items()])
            tune = False
    return out


def main() -> None:
    """Driver (launches one worker per P, saves the results and writes the report), worker
    (under horovodrun) or renderer (``--from-rows``)."""
    args = parse_args()
    if args.worker_json:
        worker(args)
        return
    if not args.render_only:
        if args.report:
            common.check_report(args.report, args.rows)
        meta = common.run_metadata()  # before any result file is written
        out = run_all(args)
        common.save_results(args.rows, {
            "meta": meta, **resolved(out["rows"], args, out["targets"]), "rows": out["rows"],
            "tuning": out["tuning"], "calibration": out["calibration"],
            "settings": {"lr_grid": args.lr_grid, "calibrate_seconds": args.calibrate_seconds,
                         "num_samples": args.num_samples}})
    common.publish(args.render_only or args.rows, render, args.report, show=True,
                   load=lambda path: load_results(path, args))


if __name__ == "__main__":
    main()
