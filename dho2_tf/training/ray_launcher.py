"""Run the training jobs on Ray workers through Horovod's ``RayExecutor`` instead of ``horovodrun``.

``horovodrun -np N -H host1:2,host2:2`` starts N processes over ssh; on a Ray cluster,
``horovod.ray.RayExecutor`` starts N Ray actors instead, sets the same Horovod environment
(``HOROVOD_RANK``, ``HOROVOD_SIZE``, the Gloo rendezvous) in each and runs a function on all of
them. :func:`run_on_ray` runs :func:`dho2_tf.training.experiment.train` that way: every worker trains with
the same :class:`~dho2_tf.training.experiment.TrainConfig` exactly as under ``horovodrun`` (same seeds, same
data shards by rank, logs on rank 0 only) and rank 0's :class:`~dho2_tf.training.experiment.TrainResult`
is returned. Without an address a local Ray instance is started (and stopped at the end) with one
CPU per worker.

Ray is an optional dependency: ``pip install '.[ray]'`` (Ray 2.9.3 with protobuf < 5, which keeps
TensorFlow 2.15.1's protobuf and grpcio ranges).

:func:`run_elastic_function_on_ray` runs a Horovod Elastic job (e.g. ``jobs/train_elastic.py``,
:func:`dho2_tf.training.elastic.elastic_train`) on Ray through ``RayExecutor(min_workers=...,
max_workers=...)``: every Ray node is a host, a failed worker's host is blacklisted and the others
go on from the last commit.

``python -m dho2_tf.training.ray_launcher --check`` checks that a cluster is usable before a long run: one
allreduce over all workers, the host of every rank, and (``--shared-dir``) that a folder written by
every rank is seen by every rank. It runs on Ray workers, or in place under ``horovodrun``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import socket
import sys
import threading
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from dho2_tf.distributed.ray_executor import require_ray
from dho2_tf.validation import check_int

if TYPE_CHECKING:
    from dho2_tf.training.experiment import TrainConfig, TrainResult

REPO = Path(__file__).resolve().parents[2]
# Driver settings that the workers get too (Horovod tuning, TensorFlow and OpenMP threads).
PASSED_ENV = ("TF_CPP_MIN_LOG_LEVEL", "OMP_NUM_THREADS", "HOROVOD_CYCLE_TIME",
              "HOROVOD_FUSION_THRESHOLD", "HOROVOD_LOG_LEVEL", "HOROVOD_TIMELINE")
# Ray forwards the workers' output asynchronously; the driver waits this long at most for the
# last lines (each worker's end-of-output marker) before it stops the workers; after a failure
# the other workers are stuck in a collective and never print theirs, so it waits less.
OUTPUT_WAIT_S = 15.0
OUTPUT_WAIT_AFTER_FAILURE_S = 3.0
# Elastic runs: seconds to wait for --min-workers after a failure (horovodrun's default is 600),
# and the Gloo interface on a local Ray instance (Horovod needs one, or two hosts, to start).
ELASTIC_TIMEOUT_S = 60
LOCAL_NICS = ("lo",)


def worker_env() -> dict[str, str]:
    """Environment of every Ray worker: the repository on ``PYTHONPATH``, quiet TensorFlow.

    The repository must sit at the same path on every node (as for ``horovodrun``).
    """
    env = {name: os.environ[name] for name in PASSED_ENV if name in os.environ}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    paths = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """Connect to the Ray cluster at ``address``, or start a local one with ``num_cpus`` CPUs.

    A session this call opened is shut down on exit, also on error; if Ray is already initialised
    in this process (e.g. by the caller) it is used as it is and left running.
    """
    ray, _ = require_ray()
    if ray.is_initialized():
        yield ray
        return
    runtime_env = {"env_vars": worker_env()}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env,
                 log_to_driver=True)
    try:
        yield ray
    finally:
        ray.shutdown()


def _ranked_call(fn: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any],
                 marker: str) -> tuple[int, Any]:
    """``(Horovod rank of this worker, fn(*args, **kwargs))``; runs inside a Ray worker.

    Ends with ``marker`` and the rank on stdout and stderr, so that the driver knows when it has
    received all of this worker's output (see :class:`_OutputWatch`).
    """
    rank = int(os.environ["HOROVOD_RANK"])
    try:
        return rank, fn(*args, **kwargs)
    finally:
        for stream in (sys.stdout, sys.stderr):
            print(f"{marker} {rank}", file=stream, flush=True)


class _OutputWatch:
    """Stands in for the driver's stdout and stderr while Ray workers run.

    Ray prints the workers' forwarded output through ``sys.stdout``/``sys.stderr`` as it arrives;
    this passes it through unchanged, except the end-of-output marker lines of
    :func:`_ranked_call`, which it swallows and counts. :meth:`wait` returns once every worker's
    marker arrived on both streams, i.e. all their output has been printed.
    """

    def __init__(self, marker: str, num_workers: int) -> None:
        self._pattern = re.compile(re.escape(marker) + r" (\d+)")
        self._expected = 2 * num_workers
        self._seen: set[tuple[str, int]] = set()
        self._done = threading.Condition()

    @contextlib.contextmanager
    def installed(self) -> Iterator[_OutputWatch]:
        """Wrap ``sys.stdout`` and ``sys.stderr`` for the duration of the block."""
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Filter(saved[0], "out", self), _Filter(saved[1], "err", self)
        try:
            yield self
        finally:
            sys.stdout, sys.stderr = saved

    def expect(self, num_workers: int) -> None:
        """Wait for the markers of ``num_workers`` workers (elastic runs: those that finished)."""
        with self._done:
            self._expected = 2 * num_workers

    def record(self, stream: str, line: str) -> bool:
        """Count ``line`` if it is a marker line (then it is not printed)."""
        found = self._pattern.search(line)
        if found is None:
            return False
        with self._done:
            self._seen.add((stream, int(found.group(1))))
            self._done.notify_all()
        return True

    def wait(self, timeout: float) -> bool:
        """Whether all markers arrived within ``timeout`` seconds."""
        with self._done:
            return self._done.wait_for(lambda: len(self._seen) >= self._expected, timeout)


class _Filter:
    """A text stream that drops :class:`_OutputWatch` marker lines and writes the rest."""

    def __init__(self, stream: Any, name: str, watch: _OutputWatch) -> None:
        self._stream, self._name, self._watch = stream, name, watch
        self._drop_newline = False

    def write(self, text: str) -> int:
        if self._drop_newline and text == "\n":  # print() writes the line end separately
            self._drop_newline = False
            return len(text)
        self._drop_newline = False
        kept = []
        for line in text.splitlines(keepends=True):
            if self._watch.record(self._name, line):
                self._drop_newline = not line.endswith("\n")
            else:
                kept.append(line)
        if kept:
            self._stream.write("".join(kept))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def run_function_on_ray(fn: Callable[..., Any], args: Sequence[Any] = (),
                        kwargs: dict[str, Any] | None = None, *, num_workers: int,
                        address: str | None = None, cpus_per_worker: int = 1,
                        use_gpu: bool = False, start_timeout_s: int = 60) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``num_workers`` Horovod ranks (Ray actors).

    ``fn`` must be importable by the workers (a module-level function of an installed module or
    of a module under the repository). Each worker finds itself under Horovod exactly as under
    ``horovodrun`` (``HOROVOD_RANK`` etc. set), so ``dho2_tf.default_comm()`` is a HorovodComm.

    Returns:
        The ``num_workers`` results ordered by Horovod rank.

    Raises:
        ValueError: on a bad ``num_workers`` or ``cpus_per_worker``, before Ray starts.
        ImportError: when Ray is not installed (names the extra to install).
        ray.exceptions.RayTaskError: when ``fn`` raised on a worker (with its traceback).
    """
    check_int("num_workers", num_workers, minimum=1)
    check_int("cpus_per_worker", cpus_per_worker, minimum=1)
    _, ray_executor = require_ray()
    with ray_session(address, num_cpus=num_workers * cpus_per_worker):
        settings = ray_executor.create_settings(timeout_s=start_timeout_s)
        executor = ray_executor(settings, num_workers=num_workers,
                                cpus_per_worker=cpus_per_worker, use_gpu=use_gpu)
        marker = f"dho2-ray-output-end-{uuid.uuid4().hex}"
        watch = _OutputWatch(marker, num_workers)
        with watch.installed():
            executor.start()
            ranked = None
            try:
                ranked = executor.run(_ranked_call,
                                      args=[fn, list(args), dict(kwargs or {}), marker])
            finally:  # also on error: the lines before a failure are the useful ones
                watch.wait(OUTPUT_WAIT_S if ranked is not None else OUTPUT_WAIT_AFTER_FAILURE_S)
                executor.shutdown()
    return [result for _, result in sorted(ranked, key=lambda item: item[0])]


def _elastic_call(fn: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any],
                  marker: str) -> tuple[int, Any]:
    """``(final Horovod rank of this worker, fn(*args, **kwargs))``; runs inside an elastic worker.

    A worker that finishes ends with ``marker`` and its process id on stdout and stderr (see
    :class:`_OutputWatch`); ranks change when workers leave or join, the process id does not.
    """
    from dho2_tf.distributed.comm import default_comm

    result = fn(*args, **kwargs)
    rank = default_comm().rank
    for stream in (sys.stdout, sys.stderr):
        print(f"{marker} {os.getpid()}", file=stream, flush=True)
    return rank, result


def _stop_elastic(executor: Any) -> None:
    """Shut ``executor`` down; stops Horovod's elastic driver first if a failure left it running."""
    adapter = getattr(executor, "adapter", None)
    if adapter is None:
        return
    driver = getattr(adapter, "driver", None)
    if driver is not None and not driver.finished():
        driver.stop()
    executor.shutdown()


def run_elastic_function_on_ray(fn: Callable[..., Any], args: Sequence[Any] = (),
                                kwargs: dict[str, Any] | None = None, *, min_workers: int,
                                max_workers: int | None = None, address: str | None = None,
                                cpus_per_worker: int = 1, nics: Sequence[str] | None = None,
                                elastic_timeout_s: int = ELASTIC_TIMEOUT_S,
                                discovery: Any = None, start_timeout_s: int = 60) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` under Horovod Elastic on between ``min_workers`` and
    ``max_workers`` Ray workers.

    Horovod's elastic driver (``RayExecutor(min_workers=..., max_workers=...)``) reads the hosts
    from Ray (every node is a host with one slot per ``cpus_per_worker`` CPUs), starts one worker
    (Ray actor, ``HOROVOD_ELASTIC=1``) per slot up to ``max_workers`` and, when a worker fails,
    blacklists its host and lets the others go on (``fn`` runs an ``hvd.elastic.run`` loop, e.g.
    :func:`dho2_tf.training.elastic.elastic_train`) as long as ``min_workers`` slots remain
    within ``elastic_timeout_s``; nodes that join the cluster add workers at the next commit.
    One Ray node is one host: a worker failing there ends the job (all its workers are on the
    blacklisted host); surviving the loss of a worker needs two nodes or more.

    Args:
        fn: importable by the workers, as for :func:`run_function_on_ray`.
        nics: network interfaces for Gloo (e.g. ``["eth0"]``). ``None``: ``lo`` on a local Ray
            instance; on a cluster Horovod finds the common interfaces, which needs two nodes.
        discovery: a ``horovod.runner.elastic.discovery.HostDiscovery`` used instead of Ray's
            node list; each host name ``H`` it returns must be a Ray resource ``node:H``.

    Returns:
        The results of the workers that finished, ordered by their final Horovod rank.

    Raises:
        ValueError: on a bad worker count or timeout, before Ray starts.
        ImportError: when Ray is not installed (names the extra to install).
        RuntimeError: when the job stopped without finishing (Horovod's message: a worker failed
            and no host is left, or fewer than ``min_workers`` slots for ``elastic_timeout_s``).
    """
    check_int("min_workers", min_workers, minimum=1)
    if max_workers is not None:
        check_int("max_workers", max_workers, minimum=min_workers,
                  hint=f"at least min_workers={min_workers}")
    check_int("cpus_per_worker", cpus_per_worker, minimum=1)
    check_int("elastic_timeout_s", elastic_timeout_s, minimum=1)
    _, ray_executor = require_ray()
    if nics is None and address is None:
        nics = LOCAL_NICS
    with ray_session(address, num_cpus=(max_workers or min_workers) * cpus_per_worker):
        settings = ray_executor.create_settings(timeout_s=start_timeout_s,
                                                nics=set(nics) if nics else None)
        if discovery is not None:
            settings.discovery = discovery
        executor = ray_executor(settings, min_workers=min_workers, max_workers=max_workers,
                                cpus_per_worker=cpus_per_worker,
                                elastic_timeout=elastic_timeout_s,
                                override_discovery=discovery is None)
        marker = f"dho2-ray-output-end-{uuid.uuid4().hex}"
        watch = _OutputWatch(marker, 0)
        with watch.installed():
            ranked = None
            try:
                executor.start()
                ranked = executor.run(_elastic_call,
                                      args=[fn, list(args), dict(kwargs or {}), marker])
            finally:
                # after a failure: wait for markers that never come, i.e. a few seconds
                watch.expect(len(ranked) if ranked is not None else min_workers)
                watch.wait(OUTPUT_WAIT_S if ranked is not None else OUTPUT_WAIT_AFTER_FAILURE_S)
                _stop_elastic(executor)
    return [result for _, result in sorted(ranked, key=lambda item: item[0])]


def run_job_main(script: str, argv: list[str]) -> Any:
    """``main(argv)`` of the job script ``script``, loaded as a module (its ``__main__`` block
    does not run); runs inside a Ray worker, as ``horovodrun`` would run the script."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"dho2_job_{Path(script).stem}", script)
    if spec is None or spec.loader is None:
        raise ImportError(f"Cannot load the job script {script}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def elastic_launch_parser() -> argparse.ArgumentParser:
    """The launcher flags of an elastic job script (a parent parser, for its ``--help``)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    group = parser.add_argument_group("launcher")
    group.add_argument("--launcher", choices=("horovodrun", "ray"), default="horovodrun",
                       help="horovodrun (default): this process is one worker (start it with "
                       "horovodrun); ray: this process runs the job on Ray workers under "
                       "Horovod Elastic (dho2_tf.training.ray_launcher)")
    group.add_argument("--min-workers", type=int,
                       help="ray: go on while at least this many workers remain (default 1)")
    group.add_argument("--max-workers", type=int,
                       help="ray: at most this many workers, one per CPU (default 2)")
    group.add_argument("--ray-address", help="ray: cluster address (auto, head:6379, "
                       "ray://head:10001); default: start a local Ray instance")
    group.add_argument("--network-interface", help="ray: network interface for Gloo (e.g. "
                       "eth0); needed on a one-node cluster")
    group.add_argument("--elastic-timeout", type=int, help="ray: seconds to wait for "
                       f"--min-workers after a failure (default {ELASTIC_TIMEOUT_S})")
    return parser


def elastic_launch_options(argv: list[str] | None = None) -> tuple[argparse.Namespace,
                                                                    list[str]]:
    """The launcher flags of :func:`elastic_launch_parser`, checked (exit 2 on bad input, before
    Ray starts), and the job's own flags left over."""
    parser = elastic_launch_parser()
    launch, rest = parser.parse_known_args(argv)
    ray_only = ("min_workers", "max_workers", "ray_address", "network_interface",
                "elastic_timeout")
    given = [f"--{name.replace('_', '-')}" for name in ray_only
             if getattr(launch, name) is not None]
    if launch.launcher != "ray":
        if given:
            parser.error(f"{', '.join(given)} need --launcher ray (under horovodrun, "
                         f"--min-np/--max-np set the workers)")
        return launch, rest
    if launch.min_workers is None:
        launch.min_workers = 1
    if launch.max_workers is None:
        launch.max_workers = max(2, launch.min_workers)
    if launch.elastic_timeout is None:
        launch.elastic_timeout = ELASTIC_TIMEOUT_S
    if not 1 <= launch.min_workers <= launch.max_workers:
        parser.error(f"need 1 <= --min-workers <= --max-workers. Received: "
                     f"min_workers={launch.min_workers}, max_workers={launch.max_workers}")
    if launch.elastic_timeout < 1:
        parser.error(f"--elastic-timeout must be a positive integer. Received: "
                     f"elastic_timeout={launch.elastic_timeout}")
    check_ray_launch(parser)
    return launch, rest


def check_ray_launch(parser: argparse.ArgumentParser) -> None:
    """Exit 2 through ``parser.error`` when ``--launcher ray`` cannot start: run under
    ``horovodrun`` (the launcher starts its own Horovod workers), or Ray not installed."""
    if "HOROVOD_RANK" in os.environ:
        parser.error("--launcher ray starts its own Horovod workers: run it with plain python, "
                     "not under horovodrun")
    try:
        require_ray()
    except ImportError as err:
        parser.error(str(err))


def run_elastic_job_on_ray(script: str, launch: argparse.Namespace, job_argv: list[str]) -> None:
    """Run ``main(job_argv)`` of the job ``script`` on Ray workers under Horovod Elastic, with
    the options of :func:`elastic_launch_options`; exit 1 with Horovod's message when the job
    stopped without finishing."""
    nics = [launch.network_interface] if launch.network_interface else None
    try:
        run_elastic_function_on_ray(run_job_main, (str(script), list(job_argv)),
                                    min_workers=launch.min_workers,
                                    max_workers=launch.max_workers, address=launch.ray_address,
                                    nics=nics, elastic_timeout_s=launch.elastic_timeout)
    except RuntimeError as err:
        print(f"{Path(script).name}: error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)


def train_worker(config: TrainConfig) -> TrainResult:
    """One rank of a training run: what ``jobs/train.py`` does under ``horovodrun``."""
    from dho2_tf.training.experiment import make_comm, train

    comm = make_comm(config)
    logging.basicConfig(level=logging.INFO if comm.is_root else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", force=True)
    return train(config, comm)


def run_on_ray(config: TrainConfig, num_workers: int, address: str | None = None,
               cpus_per_worker: int = 1, use_gpu: bool = False) -> TrainResult:
    """Train ``config`` on ``num_workers`` Ray workers; rank 0's result.

    The config is validated before Ray starts. ``address`` is a Ray cluster address (``auto``,
    ``ray://head:10001``, ``head:6379``); ``None`` starts a local Ray instance with
    ``num_workers * cpus_per_worker`` CPUs for the run.
    """
    config.validate()
    return run_function_on_ray(train_worker, (config,), num_workers=num_workers, address=address,
                               cpus_per_worker=cpus_per_worker, use_gpu=use_gpu)[0]


def check_worker(shared_dir: str | None = None) -> dict[str, Any]:
    """One rank of the cluster check; every rank must call it.

    An allreduce of ``rank + 1`` must give ``size (size + 1) / 2``; every rank reports its host.
    With ``shared_dir``, each rank writes a marker file there and every rank must then see all
    ``size`` markers (a shared folder for checkpoints); the markers are removed afterwards.

    Returns:
        ``{"rank", "size", "hosts" (host of each rank), "allreduce", "shared_dir"}``.

    Raises:
        RuntimeError: on every rank, when the allreduce or the shared folder is wrong.
    """
    import tensorflow as tf

    from dho2_tf.distributed.comm import default_comm

    comm = default_comm()
    total = float(comm.allreduce(tf.constant(comm.rank + 1.0, tf.float64), op="sum",
                                 name="dho2/cluster_check/allreduce"))
    hosts = comm.allgather_object(socket.gethostname(), name="dho2/cluster_check/hosts")
    expected = comm.size * (comm.size + 1) / 2
    problems = [] if total == expected else [
        f"allreduce of rank+1 over {comm.size} ranks gave {total}, expected {expected}"]
    if shared_dir is not None:
        token = comm.broadcast_object(uuid.uuid4().hex, name="dho2/cluster_check/token")
        folder = Path(shared_dir) / ".dho2_cluster_check"
        mine = folder / f"{token}-rank{comm.rank}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            mine.write_text(hosts[comm.rank])
        except OSError as err:
            problems.append(f"rank {comm.rank} on {hosts[comm.rank]} cannot write to "
                            f"{shared_dir}: {err}")
        comm.allgather_object(comm.rank, name="dho2/cluster_check/written")  # barrier
        seen = sorted(p.name for p in folder.glob(f"{token}-rank*")) if folder.is_dir() else []
        if len(seen) != comm.size:
            problems.append(f"rank {comm.rank} on {hosts[comm.rank]} sees {len(seen)} of "
                            f"{comm.size} marker files in {shared_dir}: it is not one folder "
                            f"shared by every rank")
        comm.allgather_object(comm.rank, name="dho2/cluster_check/read")  # barrier
        mine.unlink(missing_ok=True)
        comm.allgather_object(comm.rank, name="dho2/cluster_check/removed")  # barrier
        if comm.is_root:
            with contextlib.suppress(OSError):  # left alone if other files are in it
                folder.rmdir()
    problems = [p for rank_problems in comm.allgather_object(
        problems, name="dho2/cluster_check/problems") for p in rank_problems]
    if problems:
        raise RuntimeError("Cluster check failed: " + "; ".join(problems))
    return {"rank": comm.rank, "size": comm.size, "hosts": hosts, "allreduce": total,
            "shared_dir": shared_dir}


def check_cluster(num_workers: int, address: str | None = None,
                  shared_dir: str | None = None) -> dict[str, Any]:
    """:func:`check_worker` on ``num_workers`` Ray workers; rank 0's report."""
    return run_function_on_ray(check_worker, (shared_dir,), num_workers=num_workers,
                               address=address)[0]


def summary_line(report: dict[str, Any]) -> str:
    """``CLUSTER OK ranks=N hosts=h1:2,h2:2 allreduce=... shared_dir=...``."""
    counts = {host: report["hosts"].count(host) for host in report["hosts"]}
    hosts = ",".join(f"{host}:{n}" for host, n in counts.items())
    return (f"CLUSTER OK ranks={report['size']} hosts={hosts} allreduce={report['allreduce']:g} "
            f"shared_dir={report['shared_dir'] or 'unchecked'}")


def main(argv: list[str] | None = None) -> int:
    """``python -m dho2_tf.training.ray_launcher --check``: the cluster check (see the module doc)."""
    parser = argparse.ArgumentParser(description="Check that a Horovod cluster is usable: an "
                                     "allreduce over every rank, and a shared checkpoint folder.")
    parser.add_argument("--check", action="store_true", required=True,
                        help="run the cluster check")
    parser.add_argument("--num-workers", type=int, default=2,
                        help="Ray workers (ignored under horovodrun, which sets -np)")
    parser.add_argument("--ray-address", default=None,
                        help="Ray cluster address (default: start a local Ray instance)")
    parser.add_argument("--shared-dir", default=None,
                        help="folder every rank must share (e.g. the --checkpoint-dir parent)")
    args = parser.parse_args(argv)
    if "HOROVOD_RANK" in os.environ:  # under horovodrun: check in place
        report = check_worker(args.shared_dir)
        if report["rank"] != 0:
            return 0
    else:
        try:
            report = check_cluster(args.num_workers, args.ray_address, args.shared_dir)
        except (ValueError, ImportError) as err:
            parser.error(str(err))
    print(summary_line(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
