"""The prioritized-SGD benchmark: its harness (``benchmarks.prioritized.harness``), report
(``benchmarks.prioritized.rendering``) and script (``benchmarks/bench_prioritized.py``); the
timing protocol itself is exercised by the script."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

from benchmarks import bench_prioritized as job
from benchmarks.common import read_section
from benchmarks.prioritized import harness as bench, rendering as report
from dho2_tf.distributed.comm import LocalComm
from dho2_tf.training.data import Dataset

META = {"command": "python benchmarks/x.py", "commit": "0123456789abcdef0123456789abcdef01234567",
        "date": "2026-12-01T11:39:53+00:00"}


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
    assert text.startswith("- Command: `python benchmarks/x.py`\n- Commit and date: 0123456, "
                           "2026-12-01T11:39:53+00:00\n- Results: `results/x.json`\n")


def test_a_miss_counts_as_its_own_runs_budget_when_the_row_records_one():
    rows = ([row("sgd", s, 30.0, batch=240, ranks=2) for s in range(3)]
            + [row("psgd", 0, 15.0, ranks=2), row("psgd", 1, 15.0, ranks=2),
               {**row("psgd", 2, None, ranks=2), "budget_s": 180.0}])
    text = report.markdown(rows, {"mlp": 0.6}, {"mlp": 75.0}, META, "results/x.json")
    psgd_line = next(line for line in text.splitlines() if "| psgd |" in line)
    assert "15.00 [15.00–180.00]" in psgd_line  # the miss is the P = 2 budget, not 75 s
    assert "2.00× [0.17–2.00]" in psgd_line  # 30 / 180 on the missing seed
    assert "Clock budget per run (a miss counts as the budget): mlp 180 s at P = 2." in text


def test_budgets_per_rank_count_override_the_plain_ones():
    budgets = job.per_model("mlp=75,cnn=75,mlp@2=180,mnist5k/cnn@2=200")
    assert job.budget_for(budgets, "mnist1d/mlp", 1) == 75.0
    assert job.budget_for(budgets, "mnist1d/mlp", 2) == 180.0
    assert job.budget_for(budgets, "mnist5k/cnn", 2) == 200.0
    assert job.budget_for(budgets, "mnist1d/cnn", 2) == 75.0
    assert job.budget_for(job.per_model(job.DEFAULT_BUDGET), "mnist5k/cnn", 2) > \
        job.budget_for(job.per_model(job.DEFAULT_BUDGET), "mnist5k/cnn", 1)


def test_render_only_writes_the_section_of_the_results_file(tmp_path, monkeypatch, capsys):
    rows = [row("sgd", s, 2.0, batch=240) for s in range(3)] + [row("psgd", 0, 1.0)]
    results = tmp_path / "bench_prioritized.json"
    results.write_text(json.dumps({"meta": META, "targets": {"mlp": 0.6},
                                   "budgets": {"mlp": 8.0}, "rows": rows}))
    target = tmp_path / "REPORT.md"
    target.write_text("head\n<!-- BEGIN bench_prioritized -->\nold\n"
                      "<!-- END bench_prioritized -->\ntail\n")
    monkeypatch.setattr(sys, "argv", ["benchmarks/bench_prioritized.py", "--render-only",
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
    monkeypatch.setattr(sys, "argv", ["benchmarks/bench_prioritized.py", "--out", str(target),
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
    assert payload["targets"] == {"mnist1d/mlp": 0.6} and payload["budgets"] == {"mnist1d/mlp": 75}
    assert job.render(payload, "rows.json").startswith("- Command, commit and date: not recorded")


def test_output_flags_and_their_aliases():
    for flags in (["--report", "R.md", "--render-only", "r.json"],
                  ["--out", "R.md", "--from-rows", "r.json"]):
        args = job.parse_args(flags)
        assert (args.report, args.render_only) == ("R.md", "r.json")
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
    assert result.light_steps + result.full_steps == result.steps  # every step timed
    assert result.budget_s == 20.0
    if method == "psgd-default":  # bookkeeping every 16th step while uniform
        assert result.full_steps >= result.steps // 16 and result.light_steps > 0
    elif method == "sgd":
        assert result.full_steps == 0 and result.light_step_ms > 0.0


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


def test_noisy_labels_replace_exactly_the_fraction_by_other_classes():
    rng = np.random.default_rng(0)
    y = (np.arange(500) % 10).astype(np.int32)
    x = rng.normal(size=(500, 3)).astype(np.float32)
    data = Dataset(x, y, x[:5], y[:5], 10, (3,), "toy")
    noisy = bench.with_noisy_labels(data, 0.2, seed=1)
    changed = noisy.y_train != y
    assert changed.sum() == 100 and noisy.name == "toy-noisy"
    assert set(np.unique(noisy.y_train)) <= set(range(10))
    np.testing.assert_array_equal(noisy.x_train, x)
    np.testing.assert_array_equal(noisy.y_test, data.y_test)
    assert noisy.y_train.dtype == y.dtype
    with pytest.raises(ValueError, match=r"`fraction` must be in \(0, 1\). Received: fraction=1"):
        bench.with_noisy_labels(data, 1)


def test_calibrated_target_is_first_reached_after_the_minimum_time():
    curve = [(5.0, 0.50), (20.0, 0.70), (29.0, 0.72), (31.0, 0.71), (40.0, 0.74), (50.0, 0.73),
             (55.0, 0.76)]
    assert bench.calibrated_target(curve, 30.0) == 0.73  # lowest accuracy above 0.72 after 30 s
    first = next(t for t, acc in curve if acc >= 0.73)
    assert first >= 30.0
    assert bench.calibrated_target(curve, 60.0) is None  # nothing after 60 s
    assert bench.calibrated_target([(31.0, 0.7), (32.0, 0.6)], 30.0) == 0.6


def test_report_shows_the_cost_split_tuning_calibration_and_short_base_runs():
    def timed(method, seed, t, batch=0, lr=0.1, light=90, full=10):
        return {**row(method, seed, t, batch), "learning_rate": lr, "light_steps": light,
                "full_steps": full, "light_step_ms": 1.0, "full_step_ms": 3.0 if full else 0.0}
    rows = ([timed("sgd", s, 20.0, batch=240, full=0) for s in range(3)]
            + [timed("psgd-default", s, 10.0) for s in range(3)])
    tuning = [timed("psgd-default", 0, None, lr=0.4), timed("sgd", 0, 25.0, batch=240, lr=0.4,
                                                            full=0)]
    calibration = {"mlp": {"curve": [[10.0, 0.5], [31.0, 0.61], [33.0, 0.62]],
                           "target": 0.61}}
    text = report.markdown(rows, {"mlp": 0.61}, {"mlp": 75.0}, META, "r.json",
                           tuning=tuning, calibration=calibration)
    line = next(x for x in text.splitlines() if "| psgd-default |" in x)
    assert line.endswith("| 90 / 10 | 1.00 / 3.00 | 0.02 |")  # 10·(3 − 1) ms
    sgd_line = next(x for x in text.splitlines() if "sgd b=240" in x and x.startswith("|"))
    assert sgd_line.endswith("| 90 / 0 | 1.00 / – | – |")
    assert "mlp P=1 psgd-default (0.1: 10.0 s, 0.4: miss)" in text
    assert "mlp P=1 sgd b=240 (0.1: 20.0 s, 0.4: 25.0 s)" in text
    assert "mlp: 0.610 (first reached at 31.0 s)" in text
    assert "mlp 20.0 s (short)" in text
