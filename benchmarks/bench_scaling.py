"""Scaling benchmark: DHO2 state bytes, time and communication per rank vs P and mode.

Run (≈ 2–6 min on 2 CPU cores, depending on load)::

    python benchmarks/bench_scaling.py --report BENCHMARKS.md

This script is the driver: it launches one worker per P ∈ {1, 2, 4}
(:mod:`benchmarks.scaling.worker`; ``horovodrun --gloo -np P -H localhost:P``, oversubscribed
on 2 cores at P = 4; P = 1 runs as a plain process with ``LocalComm``), then prints the table
and writes ``results/bench_scaling.json`` (``--output-json``) with the run's command, commit
and date under ``meta``. The predictions come from :mod:`benchmarks.scaling.cost_model`, the
tables and the section from :mod:`benchmarks.scaling.rendering`.

Report: ``--report BENCHMARKS.md`` writes the rendered section between the
``<!-- BEGIN bench_scaling -->`` and ``<!-- END bench_scaling -->`` lines of that file (the
section is named after the results file, see :func:`benchmarks.common.section_name`);
``--output-md PATH`` writes it to a file of its own. ``--render-only results/bench_scaling.json``
renders an existing results file without running anything (with ``--report``: into the file)::

    python benchmarks/bench_scaling.py --render-only results/bench_scaling.json \\
        --report BENCHMARKS.md

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
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from benchmarks.scaling import worker  # noqa: E402
from benchmarks.scaling.rendering import render, text_table  # noqa: E402

REPO = common.REPO


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
    common.add_report_arguments(parser, "bench_scaling", "no run")
    parser.add_argument("--worker-json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in worker.QUICK.items():
            setattr(args, key, value)
    return args



def launch(args: argparse.Namespace, ranks: int, json_path: Path) -> None:
    """Run the worker for P = ``ranks`` (plain process at P = 1, else horovodrun)."""
    script = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:],
              "--worker-json", str(json_path)]
    if ranks > 1:
        script = [*common.horovodrun_prefix(ranks), *script]
    proc = subprocess.Popen(script, cwd=REPO, env=common.worker_environment(ranks))
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


def main() -> None:
    """Driver (one worker per P, then the report), worker (``--worker-json``) or renderer
    (``--render-only``)."""
    args = parse_args()
    if args.worker_json:
        worker.run(args)
        return
    if args.render_only:
        common.publish(args.render_only, render, args.report, args.output_md, show=True)
        return
    if args.report:
        common.check_report(args.report, args.output_json)
    run = common.run_metadata()   # before any result file is written
    started, library = time.perf_counter(), common.library_version()
    per_p = []
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in [int(p) for p in args.ranks.split(",")]:
            path = Path(tmp) / f"np{ranks}.json"
            load, begin = os.getloadavg()[0], time.perf_counter()
            launch(args, ranks, path)
            per_p.append({**json.loads(path.read_text()), "seconds": time.perf_counter() - begin,
                          "loadavg": [round(load, 2), round(os.getloadavg()[0], 2)]})
    meta = {**run, "machine": common.machine_summary(),
            "wall_seconds": round(time.perf_counter() - started, 1),
            "library": library, "library_end": common.library_version(),
            "versions": common.software_versions(),
            "settings": {key: getattr(args, key) for key in (
                "k", "m", "tau", "batch_size", "curvature_batch", "refresh_every",
                "warm_steps", "delivery_delay", "num_samples", "quick")},
            "hidden": list(worker.HIDDEN)}
    report = {"meta": meta, "results": per_p}
    common.save_results(args.output_json, report)
    print(text_table(report))
    print(f"wall time {meta['wall_seconds']} s; wrote {args.output_json}")
    common.publish(args.output_json, render, args.report, args.output_md)


if __name__ == "__main__":
    main()
