"""Every distribution mode reproduces DHO2's recorded trajectory (tests/golden/).

The recorded files hold the weights and eigenvalues after 30 steps with two curvature refreshes
for each mode and base at P = 1 (one process) and P = 2 (real ``horovodrun``), taken before the
optimizer was restructured; a change of any update, however small, fails here. Re-record only
for an intended change of the maths, with::

    python tests/golden/trajectory.py tests/golden/trajectory_p1.npz
    horovodrun --gloo -np 2 -H localhost:2 python tests/golden/trajectory.py \
        tests/golden/trajectory_p2.npz
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.launch import REPO, run_horovod

GOLDEN = REPO / "tests" / "golden"
SCRIPT = GOLDEN / "trajectory.py"
TOLERANCE = 1e-6


def compare(got_path: Path, want_path: Path) -> list[str]:
    """Keys whose arrays differ by more than TOLERANCE relative to the recorded max |value|."""
    got, want = np.load(got_path), np.load(want_path)
    assert sorted(got.files) == sorted(want.files), (sorted(got.files), sorted(want.files))
    bad = []
    for key in want.files:
        scale = max(float(np.max(np.abs(want[key]))), 1e-12)
        err = float(np.max(np.abs(got[key] - want[key]))) / scale
        if not err <= TOLERANCE:
            bad.append(f"{key}: relative difference {err:.3g}")
    return bad


def test_single_process_modes_reproduce_the_recorded_trajectory(tmp_path):
    out = tmp_path / "p1.npz"
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("HOROVOD_RANK", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "GOLDEN_TRAJECTORY_OK" in proc.stdout, \
        proc.stdout[-4000:] + proc.stderr[-4000:]
    assert compare(out, GOLDEN / "trajectory_p1.npz") == []


@pytest.mark.parallel
def test_two_rank_modes_reproduce_the_recorded_trajectory(tmp_path):
    out = tmp_path / "p2.npz"
    proc = run_horovod(SCRIPT, 2, args=(str(out),), timeout=600)
    assert "GOLDEN_TRAJECTORY_OK" in proc.stdout, proc.stdout[-4000:]
    assert compare(out, GOLDEN / "trajectory_p2.npz") == []


def test_comparison_detects_a_changed_update(tmp_path):
    """The check itself: one weight moved by 1e-5 of the scale is reported."""
    want = np.load(GOLDEN / "trajectory_p1.npz")
    arrays = {key: want[key].copy() for key in want.files}
    key = next(k for k in arrays if k.endswith("/weights"))
    arrays[key].flat[7] += 1e-5 * np.max(np.abs(arrays[key]))
    np.savez(tmp_path / "changed.npz", **arrays)
    assert [b.split(":")[0] for b in compare(tmp_path / "changed.npz",
                                             GOLDEN / "trajectory_p1.npz")] == [key]
