"""Benchmark harness and report (the timing protocol itself is exercised by the job)."""

from __future__ import annotations

import types

import numpy as np
import pytest

from dho2_tf.distributed.comm import LocalComm
from dho2_tf.prioritized import bench, report


def test_equal_work_batch_matches_psgd_work_per_step():
    assert bench.equal_work_batch(0.05, 0.01, 4000, 1) == 240
    assert bench.equal_work_batch(0.05, 0.01, 4000, 2) == 240  # 2·(100 + 20)
    assert bench.equal_work_batch(0.05, 0.01, 1000, 3) == 3 * (16 + 3)


def row(method: str, seed: int, t: float | None, batch: int = 0, ranks: int = 1) -> dict:
    return {"model": "mlp", "ranks": ranks, "method": method, "batch": batch, "seed": seed,
            "learning_rate": 0.1, "k": 0.05, "r": 0.01, "n_train": 4000, "time_to_target": t,
            "init_seconds": 0.0, "evaluations": 1000, "best_accuracy": 0.6}


def test_report_speedups_count_misses_as_the_budget():
    rows = ([row("sgd", s, 2.0, batch=240) for s in range(3)]
            + [row("sgd", 0, 1.0, batch=64)]
            + [row("psgd", 0, 1.0), row("psgd", 1, 1.0), row("psgd", 2, None)])
    text = report.markdown(rows, {"mlp": 0.6}, {"mlp": 8.0}, "python jobs/x.py")
    psgd_line = next(line for line in text.splitlines() if "| psgd |" in line)
    assert "| 2/3 |" in psgd_line
    assert "2.00× [0.25–2.00]" in psgd_line  # medians 2.0 / 1.0; worst seed 2.0 / 8.0
    assert "sgd b=240 (equal work, best)" in text
    assert "b=64: 1.00 s" in text and "Reproduce: `python jobs/x.py`" in text


def test_write_section_replaces_only_its_block(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nother section\n")
    report.write_section(path, "table v1\n", "<!-- b -->", "<!-- e -->")
    report.write_section(path, "table v2\n", "<!-- b -->", "<!-- e -->")
    assert path.read_text() == "# Benchmarks\n\nother section\n<!-- b -->\ntable v2\n<!-- e -->\n"


@pytest.mark.parametrize("method, batch", [("sgd", 64), ("psgd-is-ll", 0)])
def test_run_once_reaches_an_easy_target(method, batch):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 40)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    data = types.SimpleNamespace(x_train=x[:300], y_train=y[:300], x_test=x[300:],
                                 y_test=y[300:], input_shape=(40,), num_classes=2)
    spec = bench.RunSpec("mlp", method, 0.1, seed=0, batch=batch, k=0.1, r=0.05)
    result = bench.run_once(spec, data, target=0.8, budget_s=20.0, eval_every=5,
                            comm=LocalComm())
    assert result.time_to_target is not None and result.best_accuracy >= 0.8
    assert result.steps % 5 == 0 and result.n_train == 300
    per_step = batch if method == "sgd" else 30 + 15
    assert result.evaluations == result.steps * per_step + (0 if method == "sgd" else 300)
