"""Benchmark: prioritized SGD vs mini-batch SGD, wall-clock time to a target test accuracy.

Default (≈ 8–12 min on 2 CPU cores)::

    python jobs/bench_prioritized.py --out BENCHMARKS.md

launches ``horovodrun --gloo -np P`` for P = 1 and 2, runs on MNIST-1D (4000 train / 1000 test)
the MLP (40-100-100-10) and a small CNN, 3 seeds each, and prints the table. Methods: PSGD as
released (k = 5%, r = 1%, length init, projection refresh, exp-decay, top-k), PSGD with the
aggregated report, mini-batch SGD with the equal-work global batch (k + r)·n = 240, and SGD with
the best global batch of a sweep (seed 0, then the other seeds); also the unbiased
importance-sampling mode (exact and last-layer scores). SGD with momentum 0.9 for all; learning
rates were tuned once per model and method (P = 1, seed 0, grid in ``DEFAULT_LR``'s comment).
Protocol: see :mod:`dho2_tf.prioritized.bench`. ``--out`` replaces only the section between the
``prioritized-sgd`` markers of that file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Tuned once (P = 1, seed 0) on 2–5 point grids within {0.02, 0.05, 0.1, 0.2, 0.4}.
DEFAULT_LR = ("mlp/sgd=0.2,mlp/psgd=0.02,mlp/psgd+a=0.05,mlp/psgd-is=0.05,mlp/psgd-is-ll=0.05,"
              "cnn/sgd=0.2,cnn/psgd=0.1,cnn/psgd+a=0.1,cnn/psgd-is=0.2,cnn/psgd-is-ll=0.1")
BEGIN, END = "<!-- prioritized-sgd:begin -->", "<!-- prioritized-sgd:end -->"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", default="1,2", help="comma-separated P values")
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default="psgd,psgd+a,psgd-is,psgd-is-ll",
                        help="PSGD variants (keys of bench.PSGD_VARIANTS)")
    parser.add_argument("--k", type=float, default=0.05)
    parser.add_argument("--r", type=float, default=0.01)
    parser.add_argument("--sweep", default="64,128,512", help="SGD global batches (plus "
                        "the equal-work batch)")
    parser.add_argument("--lr", default=DEFAULT_LR,
                        help="learning rate per model/method (SGD with momentum 0.9)")
    parser.add_argument("--target", default="mlp=0.60,cnn=0.85", help="test accuracy per model")
    parser.add_argument("--budget", default="mlp=8,cnn=20", help="clock seconds per run")
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--out", default=None, help="markdown file to update (e.g. BENCHMARKS.md)")
    parser.add_argument("--rows", default=None, help="also save every run as JSON here")
    parser.add_argument("--from-rows", default=None, help="only render the report of a --rows file")
    parser.add_argument("--worker-json", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def per_model(text: str) -> dict[str, float]:
    """``"a=1,b=2"`` → ``{"a": 1.0, "b": 2.0}``."""
    return {key: float(value) for key, value in (item.split("=") for item in text.split(","))}


def worker(args: argparse.Namespace) -> None:
    """Runs under horovodrun: the whole plan for this P; rank 0 writes the JSON results."""
    import tensorflow as tf

    from dho2_tf.data import load_mnist1d
    from dho2_tf.distributed.comm import default_comm
    from dho2_tf.prioritized import bench

    comm = default_comm()
    threads = max(1, (os.cpu_count() or 2) // comm.size)
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    logging.basicConfig(level=logging.INFO if comm.is_root else logging.WARNING,
                        format="%(asctime)s %(message)s")
    log = logging.getLogger("bench_prioritized")
    data = load_mnist1d(num_samples=args.num_samples)
    targets, budgets, lrs = per_model(args.target), per_model(args.budget), per_model(args.lr)
    seeds = [int(s) for s in args.seeds.split(",")]
    results = []

    def run(spec: "bench.RunSpec") -> "bench.RunResult":
        res = bench.run_once(spec, data, targets[spec.model], budgets[spec.model],
                             args.eval_every, comm)
        log.info("P=%d %s: %s in %s s (%d steps, best %.3f)", comm.size, spec.model,
                 f"{spec.method}/b{spec.batch}/seed{spec.seed}", res.time_to_target,
                 res.steps, res.best_accuracy)
        results.append(res)
        return res

    for model in args.models.split(","):
        eq_batch = bench.equal_work_batch(args.k, args.r, len(data.y_train), comm.size)
        sweep = sorted({int(b) for b in args.sweep.split(",")} | {eq_batch})
        base = dict(model=model, method="sgd", learning_rate=lrs[f"{model}/sgd"], seed=seeds[0])
        first = {b: run(bench.RunSpec(batch=b, **base)) for b in sweep}
        best = min(sweep, key=lambda b: (first[b].time_to_target or float("inf"), b))
        for batch in sorted({eq_batch, best}):
            for seed in seeds[1:]:
                run(bench.RunSpec(**{**base, "batch": batch, "seed": seed}))
        for method in args.methods.split(","):
            for seed in seeds:
                run(bench.RunSpec(model, method, lrs[f"{model}/{method}"], seed, k=args.k,
                                  r=args.r))
        log.info("P=%d %s: equal-work batch %d, best swept batch %d", comm.size, model,
                 eq_batch, best)
    if comm.is_root:
        rows = [{**dataclasses.asdict(r.spec), **{f.name: getattr(r, f.name) for f in
                 dataclasses.fields(r) if f.name != "spec"}} for r in results]
        Path(args.worker_json).write_text(json.dumps(rows, indent=1))


def run_flags(argv: list[str]) -> list[str]:
    """``argv`` without the output-only flags (--out, --rows, --from-rows and their values)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.split("=")[0] in ("--out", "--rows", "--from-rows"):
            skip = "=" not in arg
        else:
            kept.append(arg)
    return kept


def launch(args: argparse.Namespace, ranks: int, json_path: Path) -> None:
    """Re-run this script under ``horovodrun --gloo -np ranks``."""
    horovodrun = Path(sys.executable).parent / "horovodrun"
    cmd = [str(horovodrun), "--gloo", "-np", str(ranks), "-H", f"localhost:{ranks}",
           sys.executable, str(Path(__file__).resolve()), *run_flags(sys.argv[1:]),
           "--worker-json", str(json_path)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2",
           "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // ranks))}
    subprocess.run(cmd, check=True, cwd=REPO, env=env)


def main() -> None:
    """Driver (launches one worker per P and writes the report) or worker (under horovodrun)."""
    args = parse_args()
    if args.worker_json:
        worker(args)
        return
    from dho2_tf.prioritized import report

    rows = json.loads(Path(args.from_rows).read_text()) if args.from_rows else []
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in [] if args.from_rows else [int(p) for p in args.ranks.split(",")]:
            path = Path(tmp) / f"np{ranks}.json"
            launch(args, ranks, path)
            rows += json.loads(path.read_text())
    if args.rows:
        Path(args.rows).write_text(json.dumps(rows, indent=1))
    command = " ".join(["python jobs/bench_prioritized.py", *run_flags(sys.argv[1:])])
    markdown = report.markdown(rows, per_model(args.target), per_model(args.budget), command)
    print(markdown)
    if args.out:
        report.write_section(Path(args.out), markdown, BEGIN, END)


if __name__ == "__main__":
    main()
