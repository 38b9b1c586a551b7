"""The README's Keras example, custom loop and prioritized example, as written, on 1 rank and on
2 horovodrun ranks.

``tests/parallel/readme_check.py`` runs every check once per world size (one process, then one
``horovodrun -np 2`` for the whole module). The examples run with the epoch count shortened
from 30 to :data:`EPOCHS` (Keras) and 1 (custom loop; with a short refresh schedule per mode),
the only substitutions the script makes.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers.launch import REPO, horovod_env, run_horovod

SCRIPT = REPO / "tests" / "parallel" / "readme_check.py"
EPOCHS = 5
#: DHO2's test accuracy may fall short of SGD(0.1, momentum=0.9)'s by at most this much
#: (absolute; the seed-to-seed spread of either optimizer on MNIST-1D after 5 epochs is ~0.02).
MARGIN = 0.03
MODES = ("replicated", "sharded", "faithful", "admm")


def results(stdout: str) -> dict[str, dict]:
    rows = [json.loads(line.split("RESULT ", 1)[1]) for line in stdout.splitlines()
            if "RESULT {" in line]
    out: dict[str, dict] = {}
    for row in rows:
        key = row["check"] if row["check"] != "unbroadcast" else f"unbroadcast {row['rank']}"
        out[key] = row
    return out


@pytest.fixture(scope="module")
def one_rank() -> tuple[dict[str, dict], str]:
    proc = subprocess.run([sys.executable, str(SCRIPT), str(EPOCHS)], cwd=REPO,
                          env=horovod_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return results(proc.stdout), proc.stdout


@pytest.fixture(scope="module")
def two_ranks() -> tuple[dict[str, dict], str]:
    proc = run_horovod(SCRIPT, np=2, args=(str(EPOCHS),), timeout=1200)
    return results(proc.stdout), proc.stdout + proc.stderr


def check_keras(row: dict) -> None:
    assert row["dho2"] >= row["sgd"] - MARGIN, row
    assert row["sgd"] > 0.3, row   # both actually trained (chance is 0.1)


def check_loops(rows: dict[str, dict], modes: tuple[str, ...], ranks: int) -> None:
    for mode in modes:
        row = rows[f"loop {mode}"]
        assert row["ranks"] == ranks
        assert row["after"] == row["after"], row                 # finite
        if mode != "faithful":
            # The released window extrapolation (faithful's default) at lr 0.1 and the default
            # c does not lower the loss within 80 steps; the other modes train.
            assert row["after"] < row["before"] - 0.2, row
        # and refreshed on every rank: W = 10, T = 20 over 80 (P = 1) or 40 (P = 2) steps
        assert all(r >= 80 // ranks // 20 for r in row["refreshes"]), row
        assert row["identical"], row                            # broadcast + consensus
        if mode == "admm":
            assert row["rounds"] == row["steps"] // 4, row        # tau = 4: every round ran


def check_prioritized(row: dict, ranks: int) -> None:
    """The prioritized example trains: its loss falls every epoch and it ends far above chance
    (0.1) on the held-out set (0.56 in one process when it was written)."""
    assert row["ranks"] == ranks
    assert all(b < a for a, b in zip(row["loss"], row["loss"][1:])), row
    assert row["val_accuracy"] > 0.4, row


def test_prioritized_example_one_rank_trains(one_rank):
    check_prioritized(one_rank[0]["prioritized"], 1)


def test_keras_example_one_rank_reaches_the_base_optimizer(one_rank):
    check_keras(one_rank[0]["keras"])


def test_custom_loop_one_rank_every_mode(one_rank):
    check_loops(one_rank[0], MODES, 1)


@pytest.mark.parallel
def test_keras_example_two_ranks_reaches_the_base_optimizer(two_ranks):
    check_keras(two_ranks[0]["keras"])


@pytest.mark.parallel
def test_keras_example_two_ranks_output_hygiene(two_ranks):
    """Progress bar on rank 0 only; no Keras "batch hook is slow" warning from the callback."""
    output = two_ranks[1]
    assert [line for line in output.splitlines() if line.startswith("[0]") and "/step" in line]
    assert not [line for line in output.splitlines()
                if line.startswith("[1]") and ("/step" in line or "Epoch 1/" in line)]
    assert "is slow compared to the batch time" not in output


@pytest.mark.parallel
def test_custom_loop_two_ranks_every_mode(two_ranks):
    check_loops(two_ranks[0], MODES + ("pipelined",), 2)


@pytest.mark.parallel
def test_prioritized_example_two_ranks_trains(two_ranks):
    check_prioritized(two_ranks[0]["prioritized"], 2)


@pytest.mark.parallel
def test_unbroadcast_ranks_fail_at_the_first_step(two_ranks):
    for rank in (0, 1):
        message = two_ranks[0][f"unbroadcast {rank}"]["message"]
        assert "start from different weights" in message and "training_loop" in message
