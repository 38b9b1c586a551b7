"""Benchmark harness and report (the timing protocol itself is exercised by the job)."""

from __future__ import annotations

import types

import numpy as np
import pytest

from dho2_tf.training.data import Dataset
from dho2_tf.distributed.comm import LocalComm
from dho2_tf.training import prioritized_bench as bench, prioritized_report as report


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


@pytest.mark.parametrize("method, batch", [("sgd", 64), ("psgd-is-ll", 0), ("psgd-default", 0),
                                           ("psgd-pool", 0)])
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
    free = bench.PSGD_VARIANTS.get(method, {}).get("refresh") == "free"
    per_step = batch if method == "sgd" else 30 + (0 if free else 15)  # K (+ R refreshed)
    assert result.evaluations == result.steps * per_step + (0 if method == "sgd" else 300)


def test_redundant_task_repeats_exactly_the_easiest_examples():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [4.0, 0.0]])
    y = np.arange(40) % 2
    x = (centres[y] + rng.normal(size=(40, 2))).astype(np.float32)
    data = Dataset(x, y.astype(np.int32), x[:4], y[:4].astype(np.int32), 2, (2,), "toy")
    # Ground truth: margin = distance to the other class mean − distance to the own one.
    means = np.stack([x[y == c].mean(axis=0) for c in (0, 1)])
    dist = np.linalg.norm(x[:, None] - means[None], axis=2)
    margin = dist[np.arange(40), 1 - y] - dist[np.arange(40), y]
    easy = np.sort(np.argsort(-margin)[:10])
    np.testing.assert_array_equal(bench.easy_examples(x, y, 0.25), easy)
    redundant = bench.with_redundancy(data, repeats=3, easy_fraction=0.25)
    assert len(redundant.y_train) == 40 + 2 * 10 and redundant.name == "toy-redundant"
    rows, counts = np.unique(redundant.x_train, axis=0, return_counts=True)
    assert len(rows) == 40
    repeated = {tuple(r) for r, c in zip(rows, counts) if c == 3}
    assert repeated == {tuple(r) for r in x[easy]} and set(counts) == {1, 3}
    np.testing.assert_array_equal(redundant.x_test, data.x_test)
    with pytest.raises(ValueError, match=r"`repeats` must be an integer ≥ 2. Received: repeats=1"):
        bench.with_redundancy(data, repeats=1)
    with pytest.raises(ValueError, match=r"`task` must be one of"):
        bench.load_task("cifar")
