"""Run under horovodrun (elastic or static): DHO2 on the MNIST-1D MLP via ``elastic_train``.

With ``--kill-step K --kill-host H --drain D`` the worker whose ``HOROVOD_HOSTNAME`` is H
creates the file D/H (``jobs/elastic/discover_hosts.sh`` with ``DHO2_ELASTIC_DRAIN=D`` then stops
listing H) and dies with ``os._exit(1)`` before global step K; it prints ``KILL step=K``. With
``--grow-step K --grow-hosts-file F`` rank 0 appends ``--grow-host`` to F (the discovery
script's ``DHO2_ELASTIC_HOSTS_FILE``) before step K and prints ``GROW step=K``. Rank 0 logs
``elastic commit: ...``/``elastic start: ...``; every rank that finishes prints one line
``ELASTIC_RESULT {json}``.

For kills from outside (``tests/jobs/test_train_elastic_parallel.py`` sends SIGKILL): ``--pid-dir D``
makes every worker keep ``D/rank<r>.json`` = ``{"pid", "rank", "size", "step"}`` up to date at
each start and commit (atomically replaced); ``--commit-dir C`` saves every commit of every
worker as ``C/commit-<pid>-<step>.pkl`` and its final weights as ``C/final-<pid>.pkl``;
``--replay-from F`` continues from such a commit file instead of starting at step 0 (in one
process: the reference a recovered job is compared with); ``--step-delay S`` sleeps S seconds
before every step, so that a kill from outside lands mid-training (a step of this small model
takes milliseconds).

Usage:
  elastic_train_check.py [--epochs N] [--kill-step K --kill-host H --drain D]
                         [--grow-step K --grow-hosts-file F [--grow-host H:S]]
                         [--pid-dir D] [--commit-dir C] [--replay-from F] [--step-delay S]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pickle
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import tensorflow as tf

from dho2_tf import models
from dho2_tf.training.data import load_mnist1d
from dho2_tf.distributed.comm import Communicator, HorovodComm, LocalComm
from dho2_tf.training.elastic import ElasticConfig, elastic_train, log_on_root

GLOBAL_BATCH, COMMIT_EVERY = 100, 15


def kill_hook(step_to_die: int, host: str, drain: str) -> Callable[[int, Communicator], None]:
    """Return a hook that kills this worker before ``step_to_die`` if it runs on ``host`` (once)."""
    flag = os.path.join(drain, host)

    def hook(step: int, comm: Communicator) -> None:
        if step == step_to_die and os.environ.get("HOROVOD_HOSTNAME") == host \
                and not os.path.exists(flag):
            Path(flag).touch()
            print(f"KILL step={step} rank={comm.rank} host={host}", flush=True)
            os._exit(1)

    return hook


def grow_hook(step_to_grow: int, hosts_file: str, entry: str) -> Callable[[int, Communicator],
                                                                         None]:
    """Return a hook that appends ``entry`` to ``hosts_file`` on rank 0 before ``step_to_grow``."""

    def hook(step: int, comm: Communicator) -> None:
        path = Path(hosts_file)
        if step == step_to_grow and comm.is_root and entry not in path.read_text().split():
            with path.open("a") as f:
                f.write(entry + "\n")
            print(f"GROW step={step} host={entry}", flush=True)

    return hook


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def progress_hooks(pid_dir: str | None, commit_dir: str | None):
    """``(on_step_begin, on_commit)`` hooks that publish this worker's pid, rank and commits."""
    state = {"announced": None}

    def publish(step: int, comm: Communicator) -> None:
        if pid_dir is not None:
            record = {"pid": os.getpid(), "rank": comm.rank, "size": comm.size, "step": step}
            write_atomically(Path(pid_dir) / f"rank{comm.rank}.json",
                             json.dumps(record).encode())

    def on_step_begin(step: int, comm: Communicator) -> None:
        if state["announced"] != (comm.rank, comm.size):  # first step after each (re)start
            state["announced"] = (comm.rank, comm.size)
            publish(step, comm)

    def on_commit(commit: dict, comm: Communicator) -> None:
        if commit_dir is not None:
            write_atomically(Path(commit_dir) / f"commit-{os.getpid()}-{commit['step']}.pkl",
                             pickle.dumps(commit))
        publish(commit["step"], comm)

    return on_step_begin, on_commit


def throttle(seconds: float):
    """A hook sleeping ``seconds`` before every step (``None`` when 0)."""
    if seconds <= 0:
        return None
    return lambda step, comm: time.sleep(seconds)


def chain(*hooks):
    """One ``on_step_begin`` hook calling every non-``None`` hook in order."""
    hooks = [h for h in hooks if h is not None]

    def run(step: int, comm: Communicator) -> None:
        for h in hooks:
            h(step, comm)

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--kill-step", type=int, default=None)
    parser.add_argument("--kill-host", default="127.0.0.1")
    parser.add_argument("--drain", default=None)
    parser.add_argument("--grow-step", type=int, default=None)
    parser.add_argument("--grow-hosts-file", default=None)
    parser.add_argument("--grow-host", default="127.0.0.1:1")
    parser.add_argument("--pid-dir", default=None)
    parser.add_argument("--commit-dir", default=None)
    parser.add_argument("--replay-from", default=None)
    parser.add_argument("--step-delay", type=float, default=0.0)
    args = parser.parse_args()
    # hvd.init: not a collective, allowed before the elastic loop. A replay is one process.
    comm = LocalComm() if args.replay_from else HorovodComm()
    # As jobs/train_elastic.py: progress on the current rank 0 (also a survivor that was rank 1).
    logging.basicConfig(stream=sys.stdout, format="%(asctime)s %(message)s")
    log_on_root(comm)
    data = load_mnist1d()
    tf.keras.utils.set_random_seed(0)
    model = models.get("mlp", (40,), 10)
    total = args.epochs * (len(data.x_train) // GLOBAL_BATCH)
    optimizer_config = {
        "learning_rate": tf.keras.optimizers.schedules.CosineDecay(0.05, total),
        "base": "momentum", "k": 10, "refresh_every": 50, "warmup": 50}
    hook = None
    if args.kill_step is not None:
        hook = kill_hook(args.kill_step, args.kill_host, args.drain)
    elif args.grow_step is not None:
        hook = grow_hook(args.grow_step, args.grow_hosts_file, args.grow_host)
    announce, on_commit = progress_hooks(args.pid_dir, args.commit_dir)
    resume = None
    if args.replay_from:
        with open(args.replay_from, "rb") as f:
            resume = pickle.load(f)
    result = elastic_train(
        model, optimizer_config, (data.x_train, data.y_train, data.x_test, data.y_test),
        ElasticConfig(epochs=args.epochs, global_batch=GLOBAL_BATCH, curvature_batch=400,
                      commit_every=COMMIT_EVERY), comm=comm,
        on_step_begin=chain(hook, announce, throttle(args.step_delay)),
        on_commit=on_commit, resume=resume)
    if args.commit_dir is not None:
        final = Path(args.commit_dir) / f"final-{os.getpid()}.pkl"
        write_atomically(final, pickle.dumps([w for w in model.get_weights()]))
    print("ELASTIC_RESULT " + json.dumps({**dataclasses.asdict(result), "rank": comm.rank,
                                          "steps_per_epoch": total // args.epochs,
                                          "commit_every": COMMIT_EVERY,
                                          "final_size": comm.size, "pid": os.getpid()}),
          flush=True)


if __name__ == "__main__":
    main()
