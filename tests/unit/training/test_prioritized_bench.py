"""Benchmark harness and report (the timing protocol itself is exercised by the job)."""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import numpy as np
import pytest

from dho2_tf.training.data import Dataset
from dho2_tf.distributed.comm import LocalComm
from dho2_tf.training import prioritized_bench as bench, prioritized_report as report
from dho2_tf.training.report import REPO, read_section

META = {"command": "python jobs/x.py", "commit": "0123456789abcdef0123456789abcdef01234567",
        "date": "2026-12-01T11:39:53+00:00"}


def load_job():
    spec = importlib.util.spec_from_file_location("bench_prioritized_job",
                                                  REPO / "jobs" / "bench_prioritized.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


job = load_job()


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
    text = report.markdown(rows, {"mlp": 0.6}, {"mlp": 8.0}, META, "results/x.json")
    psgd_line = next(line for line in text.splitlines() if "| psgd |" in line)
    assert "| 2/3 |" in psgd_line
    assert "2.00× [0.25–2.00]" in psgd_line  # medians 2.0 / 1.0; worst seed 2.0 / 8.0
    assert "sgd b=240 (equal work, best)" in text
    assert "b=64: 1.00 s" in text
    assert text.startswith("- Command: `python jobs/x.py`\n- Commit and date: 0123456, "
                           "2026-12-01T11:39:53+00:00\n- Results: `results/x.json`\n")


def test_render_only_writes_the_section_of_the_results_file(tmp_path, monkeypatch, capsys):
    rows = [row("sgd", s, 2.0, batch=240) for s in range(3)] + [row("psgd", 0, 1.0)]
    results = tmp_path / "bench_prioritized.json"
    results.write_text(json.dumps({"meta": META, "targets": {"mlp": 0.6},
                                   "budgets": {"mlp": 8.0}, "rows": rows}))
    target = tmp_path / "REPORT.md"
    target.write_text("head\n<!-- BEGIN bench_prioritized -->\nold\n"
                      "<!-- END bench_prioritized -->\ntail\n")
    monkeypatch.setattr(sys, "argv", ["jobs/bench_prioritized.py", "--render-only",
                                      str(results), "--report", str(target)])
    job.main()
    expected = report.markdown(rows, {"mlp": 0.6}, {"mlp": 8.0}, META, str(results))
    assert read_section(target, "bench_prioritized") == expected
    assert target.read_text().startswith("head\n<!-- BEGIN") and \
        target.read_text().endswith("<!-- END bench_prioritized -->\ntail\n")
    assert "wrote section bench_prioritized" in capsys.readouterr().out


def test_a_report_without_the_markers_fails_before_any_run(tmp_path, monkeypatch):
    target = tmp_path / "REPORT.md"
    target.write_text("no markers\n")
    monkeypatch.setattr(job, "run_all", lambda args: pytest.fail("ran"))
    monkeypatch.setattr(sys, "argv", ["jobs/bench_prioritized.py", "--out", str(target),
                                      "--rows", str(tmp_path / "bench_prioritized.json")])
    with pytest.raises(ValueError, match="'<!-- BEGIN bench_prioritized -->' is missing"):
        job.main()
    assert target.read_text() == "no markers\n"


def test_older_results_files_render_with_the_command_line_settings(tmp_path):
    rows = [{**r, "model": "mnist1d/mlp"}
            for r in [row("sgd", s, 2.0, batch=240) for s in range(3)] + [row("psgd", 0, 1.0)]]
    results = tmp_path / "rows.json"
    results.write_text(json.dumps(rows))
    payload = job.load_results(str(results), job.parse_args([]))
    assert payload["meta"] is None and payload["rows"] == rows
    assert payload["targets"] == {"mnist1d/mlp": 0.6} and payload["budgets"] == {"mnist1d/mlp": 8}
    assert job.render(payload, "rows.json").startswith("- Command, commit and date: not recorded")


def test_output_flags_and_their_aliases():
    args = job.parse_args(["--report", "R.md", "--render-only", "r.json"])
    assert (args.out, args.from_rows) == ("R.md", "r.json")
    assert job.parse_args([]).rows == "results/bench_prioritized.json"
    assert job.run_flags(["--seeds", "0", "--report", "R.md", "--out=R.md", "--rows", "x",
                          "--render-only", "y", "--ranks", "1"]) == ["--seeds", "0", "--ranks",
                                                                     "1"]


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
