"""Run under horovodrun: ranks that disagree on the run's configuration stop together.

Usage:
  consistency_run.py CASE [CASE ...]   for each case the ranks build configurations differing
                                       in one field and call ``train``; every rank must raise
                                       RunConsistencyError naming the field, before training
  consistency_run.py job FLAGS...      ``jobs/train.py``'s ``main(FLAGS)`` on every rank; prints
                                       ``rank R JOB_START I`` (on stdout and stderr) before run
                                       I, ``rank R JOB_STATUS S`` then ``rank R JOB_SECONDS T``
                                       after it (errors go to stderr; an argparse exit is its
                                       status). ``{rank}`` in a flag becomes the
                                       rank; a flag ``rR:TEXT`` is TEXT on rank R and left out
                                       on the others (rank-dependent runs); ``++`` separates the
                                       flags of consecutive runs. Horovod is started by the
                                       first run's ``main``, as when ``jobs/train.py`` is
                                       launched directly

  consistency_run.py job FLAGS... --cases CASE...
                                       the jobs, then the cases (in the same processes)

  consistency_run.py api [job ...]     before anything else starts Horovod: ``DHO2`` with
                                       ``mode="pipelined"`` on rank 1 only creates its own
                                       communicator, which must raise RunConsistencyError on
                                       every rank (printed after ``rank R API_ERROR``); then
                                       the rest of the arguments as above

Each case prints ``rank R CONSISTENCY_ERROR case=C seconds=S`` followed by the error message.
Runs and cases that ask for the same MNIST-1D dataset share the one generated first
(:func:`tests.helpers.mnist1d_once.generate_mnist1d_once`).
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import time
from pathlib import Path

from dho2_tf import DHO2, HorovodComm
from dho2_tf.consistency import RunConsistencyError
from dho2_tf.training.experiment import TrainConfig, train
from tests.helpers.mnist1d_once import generate_mnist1d_once

REPO = Path(__file__).resolve().parents[2]
COMMON = {"num_samples": 400, "epochs": 1, "batch_size": 50, "verbose": 0,
          "schedule": "constant"}
# case -> (rank 0's fields, rank 1's fields), on top of COMMON
CASES = {
    "batch_size": ({"optimizer": "adam", "learning_rate": 1e-3},
                   {"optimizer": "adam", "learning_rate": 1e-3, "batch_size": 25}),
    "num_samples": ({"optimizer": "sgd"}, {"optimizer": "sgd", "num_samples": 600}),
    "weight_decay": ({"optimizer": "momentum", "weight_decay": 3e-4},
                     {"optimizer": "momentum", "weight_decay": 0.0}),
    "learning_rate": ({"optimizer": "adam", "learning_rate": 1e-3},
                      {"optimizer": "adam", "learning_rate": 2e-3}),
    "k": ({"optimizer": "dho2", "k": 2, "curvature_batch": 50},
          {"optimizer": "dho2", "k": 3, "curvature_batch": 50}),
}


#: After the jobs' flags, the cases to run once the jobs are done (``job FLAGS... --cases CASE...``).
CASES_AFTER_JOBS = "--cases"


def run_case(comm, case):
    fields = {**COMMON, **CASES[case][min(comm.rank, 1)]}
    start = time.monotonic()
    try:
        train(TrainConfig.from_dict(fields), comm)
    except RunConsistencyError as err:
        print(f"rank {comm.rank} CONSISTENCY_ERROR case={case} "
              f"seconds={time.monotonic() - start:.1f}\n{err}", flush=True)
        return
    raise AssertionError(f"case {case}: no error although the ranks' configurations differ")


def load_job():
    spec = importlib.util.spec_from_file_location("train_job", REPO / "jobs" / "train.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def run_jobs(flags: list[str]) -> None:
    """``jobs/train.py``'s ``main`` once per ``++``-separated run of ``flags`` (see above)."""
    rank = int(os.environ["HOROVOD_RANK"])
    runs: list[list[str]] = [[]]
    for flag in flags:
        only = re.fullmatch(r"r(\d+):(.*)", flag)
        if flag == "++":
            runs.append([])
        elif only is None or int(only[1]) == rank:
            runs[-1].append((only[2] if only else flag).replace("{rank}", str(rank)))
    for index, argv in enumerate(runs):
        for stream in (sys.stdout, sys.stderr):   # where run ``index``'s output begins
            print(f"rank {rank} JOB_START {index}", file=stream, flush=True)
        start = time.monotonic()
        try:
            status = load_job().main(argv)
        except SystemExit as stop:   # flag and config-file errors exit from argparse
            status = stop.code
        print(f"rank {rank} JOB_STATUS {status}\n"
              f"rank {rank} JOB_SECONDS {time.monotonic() - start:.1f}", flush=True)


def run_api_process_sets() -> None:
    """Only rank 1 asks ``DHO2`` for the pipelined mode; its communicator starts Horovod."""
    rank = int(os.environ["HOROVOD_RANK"])
    opt = DHO2(k=2, mode="pipelined" if rank == 1 else "replicated")
    try:
        opt.comm
    except RunConsistencyError as err:
        print(f"rank {rank} API_ERROR\n{err}", flush=True)
        return
    raise AssertionError("DHO2's communicator started although the ranks' process sets differ")


def main() -> None:
    args = sys.argv[1:]
    generate_mnist1d_once()   # runs and cases with the same MNIST-1D arguments share one dataset
    if args[0] == "api":
        run_api_process_sets()
        args = args[1:]
    cases = args
    if args and args[0] == "job":
        end = args.index(CASES_AFTER_JOBS) if CASES_AFTER_JOBS in args else len(args)
        run_jobs(args[1:end])
        cases = args[end + 1:]
    if cases:
        comm = HorovodComm()
        for case in cases:
            run_case(comm, case)


if __name__ == "__main__":
    main()
