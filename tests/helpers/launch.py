"""Launch a script under real ``horovodrun --gloo`` processes and fail loudly on error or hang.

Every multi-process test builds its ``horovodrun`` command line here: :func:`run_horovod` runs
one to the end, :func:`start_horovod` / :func:`finish` run one in the background (for tests that
act on the workers while the job runs, e.g. kill one).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[2]


def horovodrun_path() -> str:
    """The ``horovodrun`` next to the running interpreter (the project venv)."""
    candidate = Path(sys.executable).parent / "horovodrun"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("horovodrun")
    if found is None:
        raise RuntimeError("horovodrun not found: run `make setup` (scripts/setup_env.sh) first.")
    return found


def horovod_command(script: str | Path | None, np: int | None, args: Sequence[str] = (), *,
                    horovod_args: Sequence[str] = (), module: str | None = None,
                    hosts: str | None = None) -> list[str]:
    """``horovodrun --gloo [-np np -H localhost:np] *horovod_args python script *args``.

    ``module`` runs ``python -m module`` instead of a script; ``np=None`` leaves the process
    count and hosts to ``horovod_args`` (elastic runs: ``--min-np``, host discovery, ...);
    ``hosts`` (``"10.213.0.2:1,10.213.0.3:1"``) replaces ``localhost:np`` after ``-H``.
    """
    if (script is None) == (module is None):
        raise ValueError("Give exactly one of `script` and `module`.")
    if hosts is not None and np is None:
        raise ValueError(f"`hosts` needs `np`. Received: hosts={hosts!r}, np=None")
    ranks = [] if np is None else ["-np", str(np), "-H", hosts or f"localhost:{np}"]
    target = ["-m", module] if module is not None else [str(script)]
    return [horovodrun_path(), "--gloo", *ranks, *horovod_args, sys.executable, *target, *args]


def horovod_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a launch: quiet TensorFlow, one OpenMP thread, a 90 s Gloo timeout,
    this checkout first on ``PYTHONPATH`` (so every worker imports the ``dho2_tf`` of this
    tree), then ``env``.

    Gloo's default of 30 s bounds both connecting the ranks and waiting in a collective; with
    three or four ranks sharing two cores, one rank still importing TensorFlow or tracing a
    step can exceed it, and the run dies with "Connect timeout" before any check. A launch
    given ``--gloo-timeout-seconds`` keeps its own value (horovodrun sets the variable).
    """
    full_env = dict(os.environ)
    full_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env.setdefault("HOROVOD_GLOO_TIMEOUT_SECONDS", "90")
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO)] + ([full_env["PYTHONPATH"]] if full_env.get("PYTHONPATH") else []))
    full_env.update(env or {})
    return full_env


def start_horovod(script: str | Path | None, np: int | None, args: Sequence[str] = (), *,
                  horovod_args: Sequence[str] = (), module: str | None = None,
                  env: dict[str, str] | None = None, command: Sequence[str] | None = None,
                  merge_stderr: bool = True, hosts: str | None = None) -> subprocess.Popen:
    """Start a launch (see :func:`horovod_command`, or ``command`` as given) in its own process
    group, so :func:`finish` can kill the launcher and its workers together; output piped.

    Workers on other hosts (``hosts``, or a ``command`` that launches over ssh) are not in that
    group: whoever starts them stops them (``tests/helpers/netns_hosts.py`` for simulated hosts).
    """
    cmd = list(command) if command is not None else horovod_command(
        script, np, args, horovod_args=horovod_args, module=module, hosts=hosts)
    return subprocess.Popen(cmd, cwd=REPO, env=horovod_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
                            text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """Wait for ``proc``; ``(stdout, stderr)`` (stderr is empty when merged into stdout).

    On a timeout the whole process group (launcher and workers) is killed and the test fails:
    a hang is a failure, never a skip, and leaves no process behind.
    """
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"horovodrun timed out after {timeout}s (hang): {proc.args}\n"
                             f"{(out or '')[-6000:]}\n{(err or '')[-2000:]}") from None
    return out or "", err or ""


def run_horovod(script: str | Path | None, np: int | None, args: Sequence[str] = (),
                timeout: float = 300, env: dict[str, str] | None = None, *,
                horovod_args: Sequence[str] = (), module: str | None = None,
                check: bool = True, hosts: str | None = None,
                command: Sequence[str] | None = None) -> subprocess.CompletedProcess:
    """Run ``horovodrun --gloo -np np -H localhost:np python script *args`` (``-H hosts`` when
    given; ``command`` as given instead, e.g. a launch script) to the end.

    Returns the completed process (stdout and stderr apart). Raises AssertionError (with the
    output) on a timeout, and on a non-zero exit unless ``check=False`` (for tests that expect
    the job to fail, or that read which part of it failed).
    """
    proc = start_horovod(script, np, args, horovod_args=horovod_args, module=module, env=env,
                         merge_stderr=False, hosts=hosts, command=command)
    out, err = finish(proc, timeout)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check and done.returncode != 0:
        raise AssertionError(
            f"horovodrun exited {done.returncode}: {' '.join(map(str, proc.args))}\n"
            f"--- stdout ---\n{out[-8000:]}\n--- stderr ---\n{err[-8000:]}")
    return done
