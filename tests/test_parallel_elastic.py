"""Horovod Elastic on localhost: a worker killed mid-run, and a worker added mid-run.

Two host names for one machine (``localhost:2``, ``127.0.0.1:1``, the trick Horovod's CI uses)
let the failed worker blacklist only its own "host". Both runs are compared with an
uninterrupted static run of the same script at np=2.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.launch import REPO, horovodrun_path

SCRIPT = REPO / "tests/parallel/elastic_train_check.py"
DISCOVERY = REPO / "jobs/elastic/discover_hosts.sh"
KILL_STEP, GROW_STEP = 50, 50
pytestmark = pytest.mark.parallel


def run_job(horovod_args: list[str], script_args: list[str], timeout: float,
            env: dict[str, str] | None = None) -> tuple[str, float]:
    """Run ``horovodrun --gloo <horovod_args> python SCRIPT <script_args>``; (stdout, seconds).

    The launcher and its workers run in their own process group, which is killed on a timeout,
    so a hang fails the test and leaves no process behind.
    """
    cmd = [horovodrun_path(), "--gloo", *horovod_args, sys.executable, str(SCRIPT), *script_args]
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": str(REPO), **(env or {})}
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(
            f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-8000:]}") from None
    if proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {' '.join(cmd)}\n{out[-8000:]}")
    return out, time.monotonic() - start


def results_of(out: str) -> list[dict]:
    """Parse the ``ELASTIC_RESULT`` JSON line of every worker that finished."""
    lines = [line for line in out.splitlines() if "ELASTIC_RESULT " in line]
    assert lines, out[-8000:]
    return [json.loads(line.split("ELASTIC_RESULT ", 1)[1]) for line in lines]


def scheduled_commits(result: dict) -> list[int]:
    """Every step the schedule commits at: multiples of commit_every and epoch ends."""
    spe, every = result["steps_per_epoch"], result["commit_every"]
    return [s for s in range(1, result["steps"] + 1) if s % every == 0 or s % spe == 0]


def assert_same_training_as(result: dict, ref: dict) -> None:
    """Same steps and epochs, same loss trajectory (to summation order), accuracy within 2 pt."""
    assert result["steps"] == ref["steps"]
    assert [h["epoch"] for h in result["history"]] == [h["epoch"] for h in ref["history"]]
    for got, want in zip(result["history"], ref["history"], strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=2e-2), (got, want)
    assert abs(result["test_accuracy"] - ref["test_accuracy"]) <= 0.02, (
        result["test_accuracy"], ref["test_accuracy"])


@pytest.fixture(scope="module")
def reference() -> dict:
    """An uninterrupted static run of the same script on 2 workers."""
    out, seconds = run_job(["-np", "2", "-H", "localhost:2"], [], timeout=180)
    print(f"uninterrupted np=2 run: {seconds:.0f}s")
    results = results_of(out)
    assert len(results) == 2 and results[0]["history"] == results[1]["history"]
    return results[0]


def test_killed_worker_job_finishes_without_losing_committed_steps(tmp_path: Path,
                                                                   reference: dict) -> None:
    drain = tmp_path / "drain"
    drain.mkdir()
    out, seconds = run_job(
        ["-np", "3", "--min-np", "2", "--max-np", "3", "--host-discovery-script",
         str(DISCOVERY), "--gloo-timeout-seconds", "20"],
        ["--kill-step", str(KILL_STEP), "--kill-host", "127.0.0.1", "--drain", str(drain)],
        timeout=240, env={"DHO2_ELASTIC_HOSTS": "localhost:2 127.0.0.1:1",
                          "DHO2_ELASTIC_DRAIN": str(drain)})
    print(f"elastic run with a killed worker: {seconds:.0f}s")
    assert re.search(rf"KILL step={KILL_STEP} rank=\d host=127\.0\.0\.1", out), out[-8000:]
    assert (drain / "127.0.0.1").exists()
    survivors = results_of(out)
    assert len(survivors) == 2 and {r["final_size"] for r in survivors} == {2}
    schedule = scheduled_commits(survivors[0])
    last_before = max(s for s in schedule if s < KILL_STEP)
    assert re.search(rf"elastic start: step={last_before} epoch=\d+ size=2", out)
    for result in survivors:
        # Resumed from the last commit before the failure, at the new world size ...
        assert [tuple(s) for s in result["starts"]] == [(0, 3), (last_before, 2)]
        # ... and every scheduled commit happened exactly once: no committed step was lost.
        commits = [tuple(c) for c in result["commits"]]
        assert [s for s, _ in commits] == schedule
        assert all(size == (3 if s <= last_before else 2) for s, size in commits)
        assert_same_training_as(result, reference)


def test_added_worker_joins_at_a_commit_and_gets_the_state(tmp_path: Path,
                                                           reference: dict) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost:2\n")
    out, seconds = run_job(
        ["-np", "2", "--min-np", "2", "--max-np", "3", "--host-discovery-script",
         str(DISCOVERY), "--network-interface", "lo", "--gloo-timeout-seconds", "20"],
        ["--grow-step", str(GROW_STEP), "--grow-hosts-file", str(hosts)],
        timeout=240, env={"DHO2_ELASTIC_HOSTS_FILE": str(hosts)})
    print(f"elastic run with an added worker: {seconds:.0f}s")
    assert f"GROW step={GROW_STEP} host=127.0.0.1:1" in out, out[-8000:]
    results = results_of(out)
    assert len(results) == 3 and {r["final_size"] for r in results} == {3}
    schedule = scheduled_commits(results[0])
    originals = [r for r in results if r["starts"][0] == [0, 2]]
    (joined,) = [r for r in results if r["starts"][0] != [0, 2]]
    assert len(originals) == 2
    # The membership change is taken at a commit (no roll-back): the newcomer starts there.
    (at,) = [s for s, size in joined["starts"]]
    assert at in schedule and at > GROW_STEP
    assert [tuple(s) for s in joined["starts"]] == [(at, 3)]
    for result in originals:
        assert [tuple(s) for s in result["starts"]] == [(0, 2), (at, 3)]
        commits = [tuple(c) for c in result["commits"]]
        assert [s for s, _ in commits] == schedule
        assert all(size == (2 if s <= at else 3) for s, size in commits)
    assert [s for s, _ in joined["commits"]] == [s for s in schedule if s > at]
    for result in results:
        assert result["history"] == results[0]["history"]
        assert_same_training_as(result, reference)
