"""``benchmarks/bench_time_to_accuracy.py``: the summary algebra, the rendered report section,
``--quick`` on the logistic-regression task end to end at P = 1 (plain python, no horovodrun),
and (slow) ``--quick`` on the MNIST-1D MLP under ``horovodrun -np 2``."""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import subprocess
import sys
import types

import pytest

from benchmarks import bench_time_to_accuracy as bench, common as report
from tests.helpers.launch import REPO, run_horovod


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
    assert [bench.is_loss_task(bench.TASKS[t]) for t in bench.TASKS] == [False, False, True, True,
                                                                          False]
    assert bench.DEFAULT_TASKS == list(bench.TASKS)[:4]
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
                           target=0.3)
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


def _payload():
    runs = {m: [_record(m, t) for t in (1.0, 2.0)] for m in bench.METHODS}
    result = {"task": {"target_accuracy": 0.5}, "metric": "test_accuracy",
              "chosen_learning_rates": dict.fromkeys(bench.METHODS, 0.1),
              "summary": bench.summarize(runs)}
    meta = {"command": "python benchmarks/bench_time_to_accuracy.py --seeds 2",
            "commit": "0123456789abcdef0123456789abcdef01234567",
            "date": "2026-12-01T00:00:00+00:00"}
    return {"meta": meta, "wall_seconds": 12.0, "results": {"t": result}}


def test_render_gives_provenance_table_and_where_the_time_goes():
    payload = _payload()
    text = bench.render(payload, "results/time_to_accuracy_p1.json")
    provenance, table, split, notes = text.rstrip("\n").split("\n\n")
    assert provenance.splitlines() == report.provenance_lines(
        payload["meta"], "results/time_to_accuracy_p1.json", 12.0)
    assert table == bench.table(payload["results"])
    assert split == bench.split_table(payload["results"])
    assert notes.splitlines() == [f"- {line}" for line in bench.notes(payload["results"])]
    assert len(notes.splitlines()) == len(bench.PAIRS)


def test_render_only_replaces_the_section_named_after_the_results_file(tmp_path, capsys):
    results = tmp_path / "time_to_accuracy_p1.json"
    results.write_text(json.dumps(_payload()))
    target = tmp_path / "REPORT.md"
    target.write_text("a\n<!-- BEGIN bench_time_to_accuracy_p1 -->\n"
                      "<!-- END bench_time_to_accuracy_p1 -->\nb\n")
    report.publish(str(results), bench.render, str(target), show=True)
    assert report.read_section(target, "bench_time_to_accuracy_p1") == \
        bench.render(_payload(), str(results))
    assert "wrote section bench_time_to_accuracy_p1" in capsys.readouterr().out
    target.write_text("no markers\n")
    with pytest.raises(ValueError, match="BEGIN bench_time_to_accuracy_p1 -->' is missing"):
        report.publish(str(results), bench.render, str(target), show=True)


def test_a_report_without_the_markers_fails_before_any_training(tmp_path, monkeypatch):
    monkeypatch.delenv("HOROVOD_SIZE", raising=False)
    monkeypatch.setattr(bench, "train", lambda config: pytest.fail("trained"))
    target = tmp_path / "REPORT.md"
    target.write_text("<!-- BEGIN bench_time_to_accuracy_p2 -->\n"
                      "<!-- END bench_time_to_accuracy_p2 -->\n")
    with pytest.raises(ValueError, match="bench_time_to_accuracy_p1 -->' is missing"):
        bench.main(["--quick", "--output-dir", str(tmp_path), "--report", str(target)])
    assert not (tmp_path / "time_to_accuracy_p1.json").exists()


def test_epoch_split_adds_up_and_explains_the_speedup():
    # Base: 10 epochs to target in 20 s (2 s an epoch). DHO2: 4 epochs in 12 s (3 s an epoch),
    # of which 100 steps x 0.02 s = 2 s an epoch of steps and 2 s of refreshes in total.
    base = [{"time_to_target": 20.0, "epochs_to_target": 10}]
    dho2 = [{"time_to_target": 12.0, "epochs_to_target": 4, "step_seconds": 0.02,
             "steps_per_epoch": 100, "refresh_seconds": 2.0}]
    split = bench.epoch_split(dho2, base)
    assert split["epoch_gain"] == pytest.approx(2.5)
    assert split["epoch_cost_ratio"] == pytest.approx(1.5)
    assert split["step"] == pytest.approx(1.0) and split["refresh"] == pytest.approx(0.25)
    assert split["other"] == pytest.approx(0.25)
    assert split["epoch_gain"] / split["epoch_cost_ratio"] == pytest.approx(20.0 / 12.0)
    assert bench.epoch_split([{**dho2[0], "epochs_to_target": None,
                               "time_to_target": None}], base) == {}


def test_long_profile_lets_the_base_set_every_target(monkeypatch):
    task = bench.task_settings("mlp_mnist1d", False, "long")
    assert task["epochs"] == bench.PROFILES["long"]["mlp_mnist1d"]["epochs"]
    assert "target_accuracy" not in task and bench.base_sets_target(task)
    assert not bench.is_loss_task(task)
    history = [{"seconds": 1.0 * (i + 1), "test_accuracy": acc, "train_loss": 1.0}
               for i, acc in enumerate((0.3, 0.6, 0.702, 0.7, 0.704))]
    seen = []

    def fake_train(config):
        seen.append(config)
        return types.SimpleNamespace(
            time_to_target=None, best_accuracy=0.704, best_train_loss=1.0, train_seconds=5.0,
            history=history, steps_per_epoch=10, refreshes=[], compile_seconds=0.0)

    monkeypatch.setattr(bench, "train", fake_train)
    base = bench.run_one("mlp_mnist1d", task, "momentum", 0.1, 0)
    # best 0.704 less the 0.005 margin: the first epoch at >= 0.699 is the third.
    assert base["target_accuracy"] == pytest.approx(0.699)
    assert base["epochs_to_target"] == 3 and base["time_to_target"] == 3.0
    assert seen[-1].target_accuracy is None  # the base runs the whole budget
    dho2 = bench.run_one("mlp_mnist1d", task, "dho2_momentum", 0.1, 0,
                         target=base["target_accuracy"])
    assert seen[-1].target_accuracy == pytest.approx(0.699)  # DHO2 stops at the target
    assert dho2["epochs_to_target"] == 3
    assert bench.methods_of(["adam"]) == ["dho2_adam", "adam"]


def test_dho2_defaults_take_the_base_rate_and_only_the_curvature_batch(monkeypatch):
    assert bench.dho2_settings("cnn_mnist5k", "defaults") == {"curvature_batch": 250}
    assert bench.dho2_settings("logreg_mnist5k", "tuned") == bench.DHO2_TASK["logreg_mnist5k"]
    calls = []

    def fake_run(name, task, method, lr, seed, quick=False, target=None, dho2="tuned"):
        calls.append((method, lr, dho2))
        good = {0.1: 1.0, 0.3: 2.0}.get(lr, 3.0)  # momentum is fastest at 0.1
        return {"method": method, "learning_rate": lr, "seed": seed, "time_to_target": good,
                "best_accuracy": 0.9, "best_train_loss": 0.1, "epochs": 1,
                "refresh_seconds": 0.0}

    monkeypatch.setattr(bench, "run_one", fake_run)
    task = bench.task_settings("cnn_mnist5k", False)
    chosen, sweep = bench.sweep_fixed_target("cnn_mnist5k", task, ["momentum"],
                                             types.SimpleNamespace(is_root=False),
                                             "defaults")
    assert chosen == {"momentum": 0.1, "dho2_momentum": 0.1} and sweep["dho2_momentum"] == []
    assert {method for method, _, _ in calls} == {"momentum"}
    assert bench.results_stem("short", 2, "defaults") == "time_to_accuracy_defaults_p2"
    assert bench.results_stem("long", 1) == "time_to_accuracy_long_p1"


def test_bad_seeds_flag_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--seeds", "0"])
    assert "--seeds must be a positive integer" in capsys.readouterr().err


def test_quick_logreg_run_at_p1_writes_the_p1_result(tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO)}
    env.pop("HOROVOD_RANK", None)
    env.pop("HOROVOD_SIZE", None)
    target = tmp_path / "REPORT.md"
    target.write_text("kept\n<!-- BEGIN bench_time_to_accuracy_p1 -->\nold\n"
                      "<!-- END bench_time_to_accuracy_p1 -->\nkept too\n")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/bench_time_to_accuracy.py"),
                           "--quick", "--tasks", "logreg_mnist5k", "--output-dir",
                           str(tmp_path), "--report", str(target)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "| logreg_mnist5k | loss " in proc.stdout and "vs momentum;" in proc.stdout
    payload = json.loads((tmp_path / "time_to_accuracy_p1.json").read_text())
    assert (tmp_path / "time_to_accuracy_p1.png").stat().st_size > 10_000
    assert payload["world_size"] == 1 and payload["launcher"] == "python"
    meta = payload["meta"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                          text=True).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", meta["commit"]) and meta["commit"][:40] == head
    assert meta["command"].startswith("python ") and \
        "benchmarks/bench_time_to_accuracy.py --quick --tasks logreg_mnist5k" in meta["command"]
    datetime.datetime.fromisoformat(meta["date"])
    section = report.read_section(target, "bench_time_to_accuracy_p1")
    assert section == bench.render(payload, str(tmp_path / "time_to_accuracy_p1.json"))
    assert target.read_text().startswith("kept\n") and target.read_text().endswith("kept too\n")
    result = payload["results"]["logreg_mnist5k"]
    runs = result["runs"]
    assert list(runs) == ["dho2_momentum", "momentum", "dho2_adam", "adam"]
    for dho2, base in bench.PAIRS.values():
        (d,), (b,) = runs[dho2], runs[base]
        assert d["target_loss"] == b["target_loss"] == b["best_train_loss"]
        assert b["time_to_target"] is not None and d["refreshes"] >= 1
        assert d["learning_rate"] == b["learning_rate"]
    assert set(result["summary"]["pairs"]) == {"momentum", "adam"}


@pytest.mark.parallel
@pytest.mark.slow
def test_time_to_accuracy_benchmark_quick(tmp_path):
    script = REPO / "benchmarks" / "bench_time_to_accuracy.py"
    proc = run_horovod(script, np=2, args=("--quick", "--tasks", "mlp_mnist1d", "--output-dir",
                                          str(tmp_path)), timeout=240)
    assert "| mlp_mnist1d | acc 0.20 | dho2_momentum |" in proc.stdout
    assert "dho2_momentum time goes to" in proc.stdout and "per step" in proc.stdout
    payload = json.loads((tmp_path / "time_to_accuracy_p2.json").read_text())
    assert payload["world_size"] == 2
    runs = payload["results"]["mlp_mnist1d"]["runs"]
    assert sorted(runs) == ["adam", "dho2_adam", "dho2_momentum", "momentum"]
    assert runs["dho2_momentum"][0]["refreshes"] >= 1
    assert (tmp_path / "time_to_accuracy_p2.png").stat().st_size > 10_000
