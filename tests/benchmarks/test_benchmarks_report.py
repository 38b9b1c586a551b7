"""BENCHMARKS.md against results/: every generated section is exactly the rendering of its
results file (a hand edit between the markers fails here), and every results file says which
command, commit and date made it."""

from __future__ import annotations

import datetime
import importlib
import json
import re

import pytest

from benchmarks import common as report

REPO = report.REPO
BENCHMARKS = REPO / "BENCHMARKS.md"
RESULTS = sorted((REPO / "results").glob("*.json"))
# A section whose run saved no results file: its text is that run's printed report.
HAND_MERGED = {"bench_prioritized"}
# A results file without a section: an older format, superseded by the sections' runs.
WITHOUT_SECTION = {"time_to_accuracy.json"}
# A section whose benchmark has not run yet: its text is exactly NOT_RECORDED.
NOT_RECORDED = "Not yet recorded."
BEGIN = re.compile(r"^<!-- BEGIN (\S+) -->$", re.M)


def script_of(section: str) -> str:
    """The benchmark script that writes ``section`` (the longest script name it starts with)."""
    names = [p.stem for p in (REPO / "benchmarks").glob("bench_*.py")
             if section.startswith(p.stem)]
    assert names, f"no benchmarks/bench_*.py writes section {section!r}"
    return max(names, key=len)


def sections() -> set[str]:
    return set(BEGIN.findall(BENCHMARKS.read_text(encoding="utf-8")))


def pending() -> set[str]:
    """Sections whose benchmark has not run yet (their whole text says so)."""
    return {name for name in sections()
            if report.read_section(BENCHMARKS, name).strip() == NOT_RECORDED}


def test_every_section_has_its_results_file_or_is_known_to_lack_one():
    from_results = {report.section_name(p) for p in RESULTS if p.name not in WITHOUT_SECTION}
    assert sections() == from_results | HAND_MERGED | pending()
    assert not from_results & pending()
    assert {p.name for p in RESULTS if report.section_name(p) not in sections()} == \
        WITHOUT_SECTION
    for name in sections():
        report.read_section(BENCHMARKS, name)      # END present, once, after BEGIN
        script_of(name)


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.name)
def test_every_results_file_records_command_commit_and_date(path):
    meta = json.loads(path.read_text(encoding="utf-8"))["meta"]
    script = report.recorded_script(meta, None)
    assert script is not None, meta["command"]     # jobs/bench_*.py before the scripts moved
    assert script.rsplit("/", 1)[1] in {p.name for p in (REPO / "benchmarks").glob("bench_*.py")}
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?|unknown", meta["commit"])
    datetime.datetime.fromisoformat(meta["date"])


@pytest.mark.parametrize("path", [p for p in RESULTS if p.name not in WITHOUT_SECTION],
                         ids=lambda p: p.name)
def test_section_is_exactly_the_rendering_of_its_results_file(path):
    name = report.section_name(path)
    payload = json.loads(path.read_text(encoding="utf-8"))
    script = importlib.import_module(f"benchmarks.{script_of(name)}")
    rendered = script.render(payload, f"results/{path.name}")
    assert report.read_section(BENCHMARKS, name) == rendered, (
        f"the {name} section of BENCHMARKS.md differs from the rendering of results/"
        f"{path.name}; regenerate it: python benchmarks/{script_of(name)}.py --render-only "
        f"results/{path.name} --report BENCHMARKS.md")
    assert f"- Results: `results/{path.name}`" in rendered
    assert payload["meta"]["command"] in rendered
    assert payload["meta"]["date"] in rendered
