"""Elastic runs of ``tests/parallel/elastic_train_check.py`` (under horovodrun, Ray or over
simulated hosts): read the workers' results, kill one worker after a commit, and check that a
run recovered from SIGKILL matches a one-process replay from the commit it resumed from."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from tests.helpers.launch import REPO, horovod_env

SCRIPT = REPO / "tests/parallel/elastic_train_check.py"
DISCOVERY = REPO / "jobs/elastic/discover_hosts.sh"
SIGKILL_EPOCHS = 4  # 160 steps
# A step takes milliseconds: the workers sleep STEP_DELAY before each one, and the kill comes
# a random 0-KILL_JITTER s after a random commit among KILL_AFTER, so it lands mid-training.
STEP_DELAY, KILL_JITTER, KILL_AFTER = 0.02, 0.25, (15, 30, 40, 45, 60, 75)


def results_of(out: str) -> list[dict]:
    """Parse the ``ELASTIC_RESULT`` JSON line of every worker that finished."""
    lines = [line for line in out.splitlines() if "ELASTIC_RESULT " in line]
    assert lines, out[-8000:]
    return [json.loads(line.split("ELASTIC_RESULT ", 1)[1]) for line in lines]


def scheduled_commits(result: dict) -> list[int]:
    """Every step the schedule commits at: multiples of commit_every and epoch ends."""
    spe, every = result["steps_per_epoch"], result["commit_every"]
    return [s for s in range(1, result["steps"] + 1) if s % every == 0 or s % spe == 0]


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
