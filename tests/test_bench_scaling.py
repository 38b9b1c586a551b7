"""``jobs/bench_scaling.py --quick`` end to end for P ∈ {1, 2} (real horovodrun at P = 2), with
its report section written into a Markdown file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dho2_tf.training import report as report_lib
from tests.helpers.launch import REPO

pytestmark = [pytest.mark.parallel, pytest.mark.slow]

MODES = ("faithful", "sharded", "pipelined", "admm")


def test_quick_benchmark_reports_every_mode_and_sharded_state_halves(tmp_path: Path) -> None:
    out_json, out_md = tmp_path / "bench_scaling.json", tmp_path / "scaling.md"
    target = tmp_path / "REPORT.md"
    target.write_text("# R\n<!-- BEGIN bench_scaling -->\nold\n<!-- END bench_scaling -->\nend\n")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "jobs/bench_scaling.py"), "--quick", "--ranks", "1,2",
           "--timeout", "420", "--output-json", str(out_json), "--output-md", str(out_md),
           "--report", str(target)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)     # the driver and horovodrun, not only the driver
        stdout, stderr = proc.communicate()
        pytest.fail(f"bench_scaling --quick hung (> 900 s)\n{stdout[-4000:]}\n{stderr[-8000:]}")
    assert proc.returncode == 0, f"{stdout[-4000:]}\n{stderr[-8000:]}"
    report = json.loads(out_json.read_text())
    by_p = {block["P"]: block["modes"] for block in report["results"]}
    assert sorted(by_p) == [1, 2]
    assert set(by_p[2]) == set(MODES)
    assert set(by_p[1]) == set(MODES) - {"pipelined"}      # P = 1 cannot pipeline: n/a
    assert {r["role"] for r in by_p[2]["pipelined"]} == {"U", "C"}
    for p, modes in by_p.items():
        for mode, records in modes.items():
            assert len(records) == p, (p, mode)
            for rec in records:
                assert rec["state_bytes"] > 0 and rec["refresh"]["count"] > 0, (p, mode, rec)
    state = {p: max(r["state_bytes"] for r in by_p[p]["sharded"]) for p in by_p}
    assert state[2] <= 0.55 * state[1], state
    faithful = {p: max(r["state_bytes"] for r in by_p[p]["faithful"]) for p in by_p}
    assert faithful[2] == faithful[1]
    sharded_step = by_p[2]["sharded"][0]["step"]["by_kind"]
    assert sharded_step["reducescatter"]["count"] == 1 and sharded_step["allgather"]["count"] == 1
    text = out_md.read_text()
    assert "pipelined at P=1" in text and "Per refresh" in text
    assert report_lib.read_section(target, "bench_scaling") == text
    assert target.read_text().startswith("# R\n") and target.read_text().endswith("-->\nend\n")
    meta = report["meta"]
    assert meta["command"].startswith("python ") and "--quick --ranks 1,2" in meta["command"]
    assert meta["commit"] != "unknown" and meta["date"] in text and f"`{meta['command']}`" in text
    assert "sharded" in stdout and "wall time" in stdout
