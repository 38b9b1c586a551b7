"""Horovod Elastic on localhost: workers killed mid-run (cooperatively and with SIGKILL from
outside), a worker added mid-run, and a lost host that never comes back.

Two host names for one machine (``localhost``, ``127.0.0.1``, the trick Horovod's CI uses) let
the failed worker blacklist only its own "host". The cooperative-kill and grow runs are compared
with an uninterrupted static run of the same script at np=2; a run recovered from SIGKILL is
compared with a replay, in one process, from the commit it recovered from.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from tests.helpers.launch import REPO, finish, horovod_env, run_horovod, start_horovod

SCRIPT = REPO / "tests/parallel/elastic_train_check.py"
DISCOVERY = REPO / "jobs/elastic/discover_hosts.sh"
LAUNCHER = REPO / "jobs/elastic/run_elastic.py"
TWO_HOSTS = {"DHO2_ELASTIC_HOSTS": "localhost:1 127.0.0.1:1"}
SIGKILL_EPOCHS = 4  # 160 steps
# A step takes milliseconds: the workers sleep STEP_DELAY before each one, and the kill comes
# a random 0-KILL_JITTER s after a random commit among KILL_AFTER, so it lands mid-training.
STEP_DELAY, KILL_JITTER, KILL_AFTER = 0.02, 0.25, (15, 30, 40, 45, 60, 75)
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


def sigkill_after_commit(running: Callable[[], bool], pid_dir: Path, rank: int, min_step: int,
                         jitter: float, deadline: float = 120,
                         output: Callable[[], str] = str) -> dict:
    """SIGKILL the worker of ``rank`` ``jitter`` seconds after it committed ``min_step`` on 2
    workers.

    Polls the worker's ``rank<r>.json`` (pid, size and last committed step) while ``running()``,
    waits ``jitter`` s more (the victim may then be anywhere: inside a step's collectives, a
    commit, an evaluation, a sleep) and sends SIGKILL from this process. Returns the record read
    then; fails with ``output()`` when the job ended or ``deadline`` passed first.
    """
    path = pid_dir / f"rank{rank}.json"
    start = time.monotonic()
    while True:
        record = json.loads(path.read_text()) if path.exists() else None
        if record and record["size"] == 2 and record["step"] >= min_step:
            break
        if not running() or time.monotonic() - start > deadline:
            raise AssertionError(f"rank {rank} never reached step {min_step} on 2 workers:\n"
                                 f"{output()[-8000:]}")
        time.sleep(0.05)
    time.sleep(jitter)
    record = json.loads(path.read_text())
    assert record["size"] == 2, record
    os.kill(record["pid"], signal.SIGKILL)
    return record


def assert_recovered_and_matches_replay(survivor: dict, killed: dict, commit_dir: Path,
                                        replay_dir: Path, epochs: int) -> None:
    """The survivor of a kill -9 of ``killed`` started on 2 workers, resumed alone from the last
    commit made before the failure without losing a committed step, and ends with the losses,
    weights and accuracy of a one-process replay of ``SCRIPT`` from that commit."""
    assert survivor["pid"] != killed["pid"] and survivor["final_size"] == 1
    schedule = scheduled_commits(survivor)
    commits = [tuple(c) for c in survivor["commits"]]
    (first, restart) = [tuple(s) for s in survivor["starts"]]
    recovered = restart[0]
    # Started on 2 workers, resumed alone from the last commit it made before the failure,
    # which is at least the victim's last commit (commits are collective) ...
    assert first == (0, 2) and restart == (recovered, 1)
    assert recovered == max(s for s, size in commits if size == 2) >= killed["step"]
    # ... and every scheduled commit happened exactly once: no committed step was lost.
    assert [s for s, _ in commits] == schedule
    assert all(size == (2 if s <= recovered else 1) for s, size in commits)
    assert survivor["steps"] == epochs * survivor["steps_per_epoch"]

    # Reference: the same script in one process, from the commit the survivor recovered from.
    replay_dir.mkdir()
    commit_file = commit_dir / f"commit-{survivor['pid']}-{recovered}.pkl"
    replay = subprocess.run(
        [sys.executable, str(SCRIPT), "--epochs", str(epochs), "--replay-from",
         str(commit_file), "--commit-dir", str(replay_dir)], cwd=REPO, capture_output=True,
        text=True, timeout=120, env=horovod_env())
    assert replay.returncode == 0, replay.stdout[-4000:] + replay.stderr[-4000:]
    (want,) = results_of(replay.stdout)
    assert want["steps"] == survivor["steps"]
    assert [s for s, _ in want["commits"]] == [s for s in schedule if s > recovered]
    for got, ref in zip(survivor["history"], want["history"], strict=True):
        assert got["epoch"] == ref["epoch"]
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5), (got, ref)
    with open(commit_dir / f"final-{survivor['pid']}.pkl", "rb") as f:
        final = pickle.load(f)
    with open(replay_dir / f"final-{want['pid']}.pkl", "rb") as f:
        expected = pickle.load(f)
    with open(commit_file, "rb") as f:
        start_weights = pickle.load(f)["weights"]
    assert len(final) == len(expected)
    print("max |final - replay|:", max(float(np.max(np.abs(a - b)))
                                       for a, b in zip(final, expected)))
    for got_w, want_w, start_w in zip(final, expected, start_weights, strict=True):
        np.testing.assert_allclose(got_w, want_w, rtol=1e-4, atol=1e-6)
        assert not np.array_equal(got_w, start_w)  # training did continue after the commit
    assert survivor["test_accuracy"] == pytest.approx(want["test_accuracy"], abs=2e-3)


def kill_plan(tmp_path: Path) -> tuple[Path, Path, int, float]:
    """Folders for the workers' pid and commit files, and a random moment to kill one: the
    commit step it follows (from KILL_AFTER) and a delay after it (up to KILL_JITTER s)."""
    pid_dir, commit_dir = tmp_path / "pids", tmp_path / "commits"
    pid_dir.mkdir()
    commit_dir.mkdir()
    rng = random.Random(random.randrange(2**16))
    after, jitter = rng.choice(KILL_AFTER), rng.uniform(0.0, KILL_JITTER)
    print(f"kill {jitter:.3f}s after the commit of step {after}")
    return pid_dir, commit_dir, after, jitter


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
