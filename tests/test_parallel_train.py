"""The quick time-to-accuracy benchmark under real ``horovodrun --gloo -np 2`` (the tests of
jobs/train.py are in tests/jobs/)."""

from __future__ import annotations

import json

import pytest

from tests.helpers.launch import REPO, run_horovod

pytestmark = pytest.mark.parallel


@pytest.mark.slow
def test_time_to_accuracy_benchmark_quick(tmp_path):
    bench = REPO / "jobs" / "bench_time_to_accuracy.py"
    proc = run_horovod(bench, np=2, args=("--quick", "--tasks", "mlp_mnist1d", "--output-dir",
                                          str(tmp_path)), timeout=240)
    assert "| mlp_mnist1d | acc 0.20 | dho2_momentum |" in proc.stdout
    assert "dho2_momentum time goes to" in proc.stdout and "per step" in proc.stdout
    payload = json.loads((tmp_path / "time_to_accuracy_p2.json").read_text())
    assert payload["world_size"] == 2
    runs = payload["results"]["mlp_mnist1d"]["runs"]
    assert sorted(runs) == ["adam", "dho2_adam", "dho2_momentum", "momentum"]
    assert runs["dho2_momentum"][0]["refreshes"] >= 1
    assert (tmp_path / "time_to_accuracy_p2.png").stat().st_size > 10_000
