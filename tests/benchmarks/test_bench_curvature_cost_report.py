"""``benchmarks/bench_curvature_cost.py``: its report section, from a results file or after a run (the
measurements themselves are not run here)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from benchmarks import bench_curvature_cost as bench, common as report
from dho2_tf.distributed.comm import LocalComm

META = {"command": "python benchmarks/bench_curvature_cost.py --rounds 3",
        "commit": "0123456789abcdef0123456789abcdef01234567",
        "date": "2026-12-01T00:00:00+00:00"}


def spread(value: float) -> dict[str, float]:
    return {"min": value, "median": value, "max": value}


def results() -> dict:
    """One task with made-up numbers in the shape the benchmark writes."""
    batch = {"seconds": {key: spread(0.001) for key in
                         ("gradient", "hvp", "reductions", "refresh_float32", "refresh_float64")},
             "one_off": {"float32": {"compile_seconds": 0.5, "first_refresh_seconds": 0.6}},
             "hvp_over_gradient": spread(2.0), "ritz_float32_vs_float64_max_rel": spread(1e-7),
             "refresh_float32_over_m_hvp": spread(1.0), "refresh_float64_over_m_hvp": spread(1.1),
             "refresh_float32_split": {"hvps": 0.04, "collectives": 0.0, "rest": 0.001}}
    steps = {"base": "adam", "resolved_mode": "replicated", "refreshes": 1,
             "seconds_per_step": {"dho2": spread(0.002), "base": spread(0.001)},
             "dho2_over_base": spread(2.0)}
    return {"mlp_mnist1d": {"curvature": {"batches": {"250": batch}}, "steps": steps}}


def test_render_is_provenance_then_the_tables():
    payload = {"meta": META, "wall_seconds": 61.0, "results": results()}
    text = bench.render(payload, "results/curvature_cost_p1.json")
    assert text == "\n".join(report.provenance_lines(META, "results/curvature_cost_p1.json", 61.0)
                             + ["", bench.tables(results())]) + "\n"
    assert "| mlp_mnist1d | replicated | adam | 2.00 [2.00, 2.00] |" in text  # base as recorded
    assert bench.table(results(), 2) == "P = 2\n\n" + bench.tables(results())


def test_results_are_written_with_meta_and_their_section(tmp_path: Path, capsys):
    target = tmp_path / "REPORT.md"
    target.write_text("x\n<!-- BEGIN bench_curvature_cost_p1 -->\n"
                      "<!-- END bench_curvature_cost_p1 -->\ny\n")
    path = str(tmp_path / "curvature_cost_p1.json")
    args = argparse.Namespace(rounds=3, report=str(target))
    bench.write_results(path, META, results(), "table", args, LocalComm(), 12.5)
    payload = json.loads(Path(path).read_text())
    assert payload["meta"] == META and payload["ranks"] == 1 and payload["wall_seconds"] == 12.5
    assert report.read_section(target, "bench_curvature_cost_p1") == bench.render(payload, path)
    report.publish(path, bench.render, show=True)
    assert "- Command: `python benchmarks/bench_curvature_cost.py --rounds 3`" in capsys.readouterr().out


def test_a_report_without_the_markers_fails_before_measuring(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("HOROVOD_SIZE", raising=False)
    monkeypatch.setattr(bench, "hvp_and_refresh", lambda *a: pytest.fail("measured"))
    target = tmp_path / "REPORT.md"
    target.write_text("<!-- BEGIN bench_curvature_cost_p2 -->\n"
                      "<!-- END bench_curvature_cost_p2 -->\n")
    with pytest.raises(ValueError, match="bench_curvature_cost_p1 -->' is missing"):
        bench.main(["--output-dir", str(tmp_path), "--report", str(target)])
    assert not (tmp_path / "curvature_cost_p1.json").exists()


def test_the_hvp_formulation_table_appears_only_for_results_that_have_it():
    old = bench.tables(results())
    assert "reverse-over-reverse" not in old
    new = results()
    new["mlp_mnist1d"]["hvp_methods"] = {
        "seconds": {"reverse-over-reverse": {"one_off": spread(0.4), "hvp": spread(0.0015)},
                    "forward-over-reverse": {"one_off": spread(1.0), "hvp": spread(0.002)}},
        "one_off_reverse_over_forward": spread(0.4)}
    text = bench.tables(new)
    assert ("| mlp_mnist1d | 0.40 [0.40, 0.40] | 1.00 [1.00, 1.00] | 0.40 [0.40, 0.40] | "
            "1.5 [1.5, 1.5] | 2.0 [2.0, 2.0] |") in text
    assert text.startswith(old.split("\n\n")[0])   # the first table is unchanged
