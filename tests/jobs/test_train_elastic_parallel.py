"""Horovod Elastic on localhost: workers killed mid-run (cooperatively and with SIGKILL from
outside), a worker added mid-run, and a lost host that never comes back.

Two host names for one machine (``localhost``, ``127.0.0.1``, the trick Horovod's CI uses) let
the failed worker blacklist only its own "host". The cooperative-kill and grow runs are compared
with an uninterrupted static run of the same script at np=2; a run recovered from SIGKILL is
compared with a replay, in one process, from the commit it recovered from.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.elastic import (DISCOVERY, SCRIPT, SIGKILL_EPOCHS, STEP_DELAY,
                                   assert_recovered_and_matches_replay, kill_plan,
                                   results_of, scheduled_commits, sigkill_after_commit)
from tests.helpers.launch import REPO, finish, run_horovod, start_horovod

LAUNCHER = REPO / "jobs/elastic/run_elastic.py"
TWO_HOSTS = {"DHO2_ELASTIC_HOSTS": "localhost:1 127.0.0.1:1"}
KILL_STEP, GROW_STEP = 50, 50
pytestmark = pytest.mark.parallel


def run_job(horovod_args: list[str], script_args: list[str], timeout: float,
            env: dict[str, str] | None = None) -> tuple[str, float]:
    """Run ``horovodrun --gloo <horovod_args> python SCRIPT <script_args>``; (output, seconds).

    The launcher and its workers run in their own process group, which is killed on a timeout,
    so a hang fails the test and leaves no process behind.
    """
    start = time.monotonic()
    proc = run_horovod(SCRIPT, None, script_args, timeout=timeout, env=env,
                       horovod_args=horovod_args)
    return proc.stdout + proc.stderr, time.monotonic() - start


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


@pytest.mark.slow
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


@pytest.mark.slow
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


def start_job(horovod_args: list[str], script_args: list[str], env: dict[str, str],
              command: list[str] | None = None) -> subprocess.Popen:
    """Start ``horovodrun --gloo <horovod_args> python SCRIPT <script_args>`` (or ``command``)
    in its own process group (so a hang can be killed whole), output piped."""
    return start_horovod(SCRIPT, None, script_args, horovod_args=horovod_args, env=env,
                         command=command)


def finish_job(proc: subprocess.Popen, timeout: float) -> str:
    """Wait for ``proc``; its output. A timeout kills the process group and fails the test."""
    return finish(proc, timeout)[0]


@pytest.mark.parametrize("victim", [pytest.param(0, marks=pytest.mark.slow), 1], ids=["rank0", "rank1"])
def test_sigkill_recovers_from_the_last_commit_and_matches_a_replay(tmp_path: Path,
                                                                    victim: int) -> None:
    """kill -9 of a worker from outside: the survivor rolls back to its last commit and
    finishes alone; its final weights equal a one-process replay from that commit."""
    pid_dir, commit_dir, after, jitter = kill_plan(tmp_path)
    proc = start_job(
        ["-np", "2", "--min-np", "1", "--max-np", "2", "--host-discovery-script",
         str(DISCOVERY), "--network-interface", "lo", "--elastic-timeout", "30",
         "--gloo-timeout-seconds", "20"],
        ["--epochs", str(SIGKILL_EPOCHS), "--pid-dir", str(pid_dir), "--commit-dir",
         str(commit_dir), "--step-delay", str(STEP_DELAY)], TWO_HOSTS)
    killed = sigkill_after_commit(lambda: proc.poll() is None, pid_dir, victim, after,
                                  jitter, output=lambda: finish_job(proc, 5))
    out = finish_job(proc, timeout=120)
    assert proc.returncode == 0, out[-8000:]
    assert re.search(r"Process \d exit with status code 137", out), out[-8000:]  # SIGKILL
    detected = [ln for ln in out.splitlines() if "elastic: a collective failed" in ln]
    assert detected, out[-8000:]  # recognised as a Horovod failure, not a crash
    print(f"killed {killed}; survivor saw: {detected[0]}")
    # The survivor is rank 0 now (a former rank 1 when rank 0 was killed): it logs the restart
    # from the commit and the progress at INFO, as jobs/train_elastic.py configures it.
    assert re.search(r"elastic start: step=\d+ epoch=\d+ size=1", out), out[-8000:]
    assert re.search(r"elastic epoch \d+: loss=\S+ test_accuracy=\S+ size=1", out), out[-8000:]
    (survivor,) = results_of(out)
    assert_recovered_and_matches_replay(survivor, killed, commit_dir, tmp_path / "replay",
                                        SIGKILL_EPOCHS)


@pytest.mark.slow
def test_lost_host_that_never_returns_fails_loudly_within_the_timeout(tmp_path: Path) -> None:
    """--min-np 2 on two one-slot hosts: after kill -9 of a worker the job cannot continue;
    it must end within the elastic timeout with a non-zero status and a clear message."""
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    timeout_s = 10
    # The project's elastic launcher builds the horovodrun command line itself.
    proc = start_job([], [], TWO_HOSTS, command=[
        sys.executable, str(LAUNCHER), "--np", "2", "--min-np", "2", "--max-np", "2",
        "--elastic-timeout", str(timeout_s), "--extra=--gloo-timeout-seconds=20", "--",
        sys.executable, str(SCRIPT), "--epochs", str(SIGKILL_EPOCHS), "--pid-dir",
        str(pid_dir), "--step-delay", str(STEP_DELAY)])
    killed = sigkill_after_commit(lambda: proc.poll() is None, pid_dir, 1, 30, 0.1,
                                  output=lambda: finish_job(proc, 5))
    killed_at = time.monotonic()
    out = finish_job(proc, timeout=timeout_s + 60)
    waited = time.monotonic() - killed_at
    assert proc.returncode != 0, out[-8000:]
    assert waited < timeout_s + 45, waited  # the timeout, plus shutting the survivor down
    (message,) = [ln for ln in out.splitlines() if ln.startswith("run_elastic: error:")]
    print(f"{message} (after {waited:.0f}s)")
    assert "fewer than --min-np 2 workers were available for --elastic-timeout 10s" in message
    last = int(re.search(r"the last commit was at step (\d+)", message).group(1))
    assert last >= killed["step"]
    assert "ELASTIC_RESULT" not in out  # nobody claims to have finished
