"""``jobs/bench_time_to_accuracy.py``: the summary algebra, the git stamp, and ``--quick`` on the
logistic-regression task end to end at P = 1 (plain python, no horovodrun)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest

from tests.helpers.launch import REPO


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_tta",
                                                  REPO / "jobs" / "bench_time_to_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


def _record(method, ttt, **extra):
    return {"method": method, "time_to_target": ttt, "step_seconds": 0.01,
            "refresh_seconds": 1.0 if method.startswith("dho2") else 0.0,
            "refreshes": 1 if method.startswith("dho2") else 0, "best_accuracy": 0.9,
            "best_train_loss": 0.1, **extra}


def test_pairs_share_grids_and_every_task_has_dho2_settings():
    assert bench.PAIRS == {"momentum": ("dho2_momentum", "momentum"),
                           "adam": ("dho2_adam", "adam")}
    for task in bench.TASKS:
        assert set(bench.DHO2_TASK[task]) >= {"k", "alpha", "refresh_every", "curvature_batch"}
        for dho2, base in bench.PAIRS.values():
            assert bench.learning_rates(dho2, task) == bench.learning_rates(base, task)
    assert [bench.is_loss_task(bench.TASKS[t]) for t in bench.TASKS] == [False, False, True, True]
    quick = bench.task_settings("logreg_mnist5k", True)
    assert quick["batch_size"] == 100 and "target_accuracy" not in quick
    assert bench.task_settings("mlp_mnist1d", True)["target_accuracy"] == 0.2


def test_summary_speedups_per_pair_with_misses():
    runs = {"dho2_momentum": [_record("dho2_momentum", t) for t in (2.0, 4.0, None)],
            "momentum": [_record("momentum", t) for t in (4.0, 4.0, 6.0)],
            "dho2_adam": [_record("dho2_adam", t) for t in (1.0, 2.0, 3.0)],
            "adam": [_record("adam", t) for t in (3.0, None, 3.0)]}
    summary = bench.summarize(runs)
    mom, adam = summary["pairs"]["momentum"], summary["pairs"]["adam"]
    assert mom["per_seed"] == [2.0, 1.0, 0.0]  # a DHO2 miss is a speed-up of 0
    assert (mom["per_seed_min"], mom["per_seed_median"], mom["per_seed_max"]) == (0.0, 1.0, 2.0)
    assert mom["speedup_of_medians"] == 4.0 / 4.0
    assert adam["per_seed"] == [3.0, math.inf, 1.0] and adam["per_seed_median"] == 3.0
    assert adam["speedup_of_medians"] == 3.0 / 2.0
    assert summary["momentum"]["reached"] == 3 and summary["dho2_momentum"]["reached"] == 2
    assert math.isnan(bench.ratio(math.inf, math.inf))
    text = bench.table({"t": {"task": {"target_accuracy": 0.5}, "metric": "test_accuracy",
                              "chosen_learning_rates": dict.fromkeys(bench.METHODS, 0.1),
                              "summary": summary}})
    assert "| t | acc 0.50 | dho2_momentum | 0.1 | 4.0 [2.0, miss] | 2/3 |" in text
    assert "1.00x vs momentum; 0.00x / 1.00x / 2.00x" in text
    assert "1.50x vs adam; 1.00x / 3.00x / inf" in text


def test_a_run_dho2_stopped_as_diverged_is_a_miss_without_step_time(monkeypatch):
    def diverge(config):
        raise bench.tf.errors.InvalidArgumentError(
            None, None, "DHO2 skipped more than max_consecutive_skips=50 consecutive steps")

    monkeypatch.setattr(bench, "train", diverge)
    task = bench.task_settings("logreg_mnist5k", True)
    record = bench.run_one("logreg_mnist5k", task, "dho2_momentum", 1.0, 0, quick=True,
                           target_loss=0.3)
    assert record["diverged"] and record["time_to_target"] is None
    assert record["target_loss"] == 0.3 and record["step_seconds"] is None
    assert "diverged" in bench.describe(record)
    runs = {m: [_record(m, 2.0)] for m in bench.METHODS}
    runs["dho2_momentum"].append(record)
    runs["momentum"].append(_record("momentum", 3.0))
    for m in ("dho2_adam", "adam"):
        runs[m].append(_record(m, 2.0))
    summary = bench.summarize(runs)
    assert summary["dho2_momentum"]["reached"] == 1
    assert summary["dho2_momentum"]["step_seconds"] == 0.01  # the diverged run has none
    assert summary["pairs"]["momentum"]["per_seed"] == [1.0, 0.0]

    def other_error(config):
        raise bench.tf.errors.InvalidArgumentError(None, None, "shapes differ")

    monkeypatch.setattr(bench, "train", other_error)
    with pytest.raises(bench.tf.errors.InvalidArgumentError, match="shapes differ"):
        bench.run_one("logreg_mnist5k", task, "dho2_momentum", 1.0, 0, quick=True)


def test_git_commit_marks_a_dirty_tree(tmp_path, monkeypatch):
    run = lambda *args: subprocess.run(["git", *args], cwd=tmp_path, check=True,  # noqa: E731
                                       capture_output=True)
    run("init", "-q")
    (tmp_path / "a.txt").write_text("a")
    run("add", "a.txt")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "a")
    monkeypatch.setattr(bench, "REPO", tmp_path)
    head = bench.git_commit()
    assert re.fullmatch(r"[0-9a-f]{40}", head)
    (tmp_path / "a.txt").write_text("b")
    assert bench.git_commit() == head + "-dirty"


def test_bad_seeds_flag_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--seeds", "0"])
    assert "--seeds must be a positive integer" in capsys.readouterr().err


def test_quick_logreg_run_at_p1_writes_the_p1_result(tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO)}
    env.pop("HOROVOD_RANK", None)
    proc = subprocess.run([sys.executable, str(REPO / "jobs/bench_time_to_accuracy.py"),
                           "--quick", "--tasks", "logreg_mnist5k", "--output-dir",
                           str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "| logreg_mnist5k | loss " in proc.stdout and "vs momentum;" in proc.stdout
    payload = json.loads((tmp_path / "time_to_accuracy_p1.json").read_text())
    assert (tmp_path / "time_to_accuracy_p1.png").stat().st_size > 10_000
    assert payload["world_size"] == 1 and payload["launcher"] == "python"
    assert re.fullmatch(r"([0-9a-f]{40}(-dirty)?|unknown)", payload["git_commit"])
    assert "--quick --tasks logreg_mnist5k" in payload["command"]
    result = payload["results"]["logreg_mnist5k"]
    runs = result["runs"]
    assert list(runs) == ["dho2_momentum", "momentum", "dho2_adam", "adam"]
    for dho2, base in bench.PAIRS.values():
        (d,), (b,) = runs[dho2], runs[base]
        assert d["target_loss"] == b["target_loss"] == b["best_train_loss"]
        assert b["time_to_target"] is not None and d["refreshes"] >= 1
        assert d["learning_rate"] == b["learning_rate"]
    assert set(result["summary"]["pairs"]) == {"momentum", "adam"}
