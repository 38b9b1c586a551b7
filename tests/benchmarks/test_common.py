"""``benchmarks.common``: marker sections of a Markdown file, the provenance of a run, the
machine description and the ``--report`` / ``--render-only`` publishing every script shares."""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import common

DOCUMENT = ("# Title\r\n\nprose “unicode” before\n<!-- BEGIN other -->\nother body\n"
            "<!-- END other -->\n\n<!-- BEGIN demo -->\nold line 1\nold line 2\n"
            "<!-- END demo -->\ntrailing prose, no final newline")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "REPORT.md"
    path.write_bytes(text.encode("utf-8"))
    return path


def split_around(data: bytes, name: str) -> tuple[bytes, bytes]:
    """The bytes up to and including the BEGIN line, and from the END line on."""
    begin, end = (m.encode() for m in common.markers(name))
    head = data[:data.index(begin) + len(begin) + 1]
    return head, data[data.index(end):]


def test_replace_section_round_trip_leaves_the_rest_byte_identical(tmp_path):
    path = write(tmp_path, DOCUMENT)
    original = path.read_bytes()
    common.replace_section(path, "demo", "new | table\nsecond line\n")
    changed = path.read_bytes()
    assert common.read_section(path, "demo") == "new | table\nsecond line\n"
    assert split_around(changed, "demo") == split_around(original, "demo")
    assert common.read_section(path, "other") == "other body\n"
    common.replace_section(path, "demo", "old line 1\nold line 2\n")
    assert path.read_bytes() == original


def test_replace_section_adds_a_final_newline_and_accepts_empty_text(tmp_path):
    path = write(tmp_path, DOCUMENT)
    common.replace_section(path, "demo", "no newline")
    assert "\nno newline\n<!-- END demo -->\n" in path.read_text()
    common.replace_section(path, "demo", "")
    assert "<!-- BEGIN demo -->\n<!-- END demo -->\n" in path.read_text()
    assert common.read_section(path, "demo") == ""


def test_replace_section_keeps_the_file_mode_and_leaves_no_temporary_file(tmp_path):
    path = write(tmp_path, DOCUMENT)
    path.chmod(0o640)
    common.replace_section(path, "demo", "x\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["REPORT.md"]


@pytest.mark.parametrize("text, problem", [
    (DOCUMENT.replace("<!-- BEGIN demo -->\n", ""), r"'<!-- BEGIN demo -->' is missing"),
    (DOCUMENT.replace("<!-- END demo -->\n", ""), r"'<!-- END demo -->' is missing"),
    ("no markers at all\n", r"'<!-- BEGIN demo -->' is missing; '<!-- END demo -->' is missing"),
    (DOCUMENT + "\n<!-- BEGIN demo -->\n",
     r"'<!-- BEGIN demo -->' appears 2 times \(lines 8, 13\)"),
    (DOCUMENT + "\n<!-- END demo -->\n", r"'<!-- END demo -->' appears 2 times"),
    ("<!-- END demo -->\nbody\n<!-- BEGIN demo -->\n",
     r"'<!-- END demo -->' \(line 1\) comes before '<!-- BEGIN demo -->' \(line 3\)"),
])
def test_bad_markers_raise_naming_file_and_marker_without_touching_the_file(tmp_path, text,
                                                                            problem):
    path = write(tmp_path, text)
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": .*" + problem):
        common.replace_section(path, "demo", "new\n")
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["REPORT.md"]
    with pytest.raises(ValueError, match=problem):
        common.read_section(path, "demo")


def test_a_marker_must_be_a_whole_line_and_names_are_checked(tmp_path):
    path = write(tmp_path, "text <!-- BEGIN demo --> inline\n<!-- END demo -->\n")
    with pytest.raises(ValueError, match="'<!-- BEGIN demo -->' is missing"):
        common.replace_section(path, "demo", "x")
    with pytest.raises(ValueError, match="section name must match"):
        common.markers("two words")


def test_check_report_names_the_section_of_a_results_file(tmp_path):
    path = write(tmp_path, "<!-- BEGIN bench_x_p2 -->\n<!-- END bench_x_p2 -->\n")
    common.check_report(path, "results/x_p2.json")
    with pytest.raises(ValueError, match="'<!-- BEGIN bench_x_p1 -->' is missing"):
        common.check_report(path, "results/x_p1.json")


def test_run_metadata_records_command_commit_and_utc_date():
    argv = ["benchmarks/bench_scaling.py", "--ranks", "1,2", "--note", "with space"]
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    meta = common.run_metadata(argv)
    after = datetime.datetime.now(datetime.timezone.utc)
    assert set(meta) == {"command", "commit", "date"}
    assert meta["command"] == "python benchmarks/bench_scaling.py --ranks 1,2 --note 'with space'"
    assert shlex.split(meta["command"]) == ["python", *argv]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=common.REPO, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", meta["commit"])
    assert meta["commit"].startswith(head)
    date = datetime.datetime.fromisoformat(meta["date"])
    assert date.utcoffset() == datetime.timedelta(0) and before <= date <= after
    launched = common.run_metadata(["x.py"], launcher=["horovodrun", "-np", "2"])
    assert launched["command"] == "horovodrun -np 2 python x.py"


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo,
                   check=True, capture_output=True)


def test_git_commit_marks_changes_to_tracked_files_only(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("a")
    git(tmp_path, "add", "a.txt")
    git(tmp_path, "commit", "-q", "-m", "a")
    head = common.git_commit(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{40}", head)
    (tmp_path / "untracked.txt").write_text("u")
    assert common.git_commit(tmp_path) == head
    (tmp_path / "a.txt").write_text("b")
    assert common.git_commit(tmp_path) == head + "+dirty"
    assert common.run_metadata(["x.py"], repo=tmp_path)["commit"] == head + "+dirty"


def test_git_commit_is_unknown_outside_a_repository(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    (tmp_path / "not_a_repo").mkdir()
    assert common.git_commit(tmp_path / "not_a_repo") == "unknown"
    assert common.git_commit(tmp_path / "missing") == "unknown"


def test_horovod_launcher_rebuilds_the_launch_from_the_environment():
    assert common.horovod_launcher({}) == []
    assert common.horovod_launcher({"HOROVOD_SIZE": "1"}) == []
    env = {"HOROVOD_SIZE": "2", "HOROVOD_LOCAL_SIZE": "2", "HOROVOD_CYCLE_TIME": "0.1",
           "HOROVOD_GLOO_RENDEZVOUS_ADDR": "127.0.0.1"}
    assert common.horovod_launcher(env) == ["HOROVOD_CYCLE_TIME=0.1", "horovodrun", "--gloo",
                                            "-np", "2", "-H", "localhost:2"]
    assert common.horovod_launcher({"HOROVOD_SIZE": "4", "HOROVOD_LOCAL_SIZE": "2"}) == \
        ["horovodrun", "-np", "4"]


def test_section_names_and_provenance():
    assert common.section_name("results/curvature_cost_p2.json") == "bench_curvature_cost_p2"
    assert common.section_name("/tmp/bench_scaling.json") == "bench_scaling"
    assert common.display_path(common.REPO / "results" / "x.json") == "results/x.json"
    assert common.display_path("/elsewhere/x.json") == "/elsewhere/x.json"
    meta = {"command": "python a.py", "commit": "0123456789abcdef0123456789abcdef01234567+dirty",
            "date": "2026-12-01T11:39:53+00:00", "backfilled": True}
    assert common.provenance_lines(meta, "results/a.json", 61.2) == [
        "- Command: `python a.py`",
        "- Commit and date: 0123456+dirty, 2026-12-01T11:39:53+00:00, wall time 61 s",
        "- Results: `results/a.json` (metadata backfilled after the run)"]
    assert common.provenance_lines(None, "r.json")[0] == "- Command, commit and date: not recorded"


@pytest.mark.parametrize("ranks", [1, 2, 64])
def test_share_cores_between_ranks_gives_each_rank_its_share_of_the_cores(ranks):
    """⌊cores / P⌋ threads (at least 1) per pool, still in force after TensorFlow has run ops."""
    code = ("import os, tensorflow as tf\n"
            "from benchmarks.common import share_cores_between_ranks\n"
            "n = share_cores_between_ranks()\n"
            "tf.reduce_sum(tf.ones(3))\n"
            "print(n, tf.config.threading.get_intra_op_parallelism_threads(),\n"
            "      tf.config.threading.get_inter_op_parallelism_threads())\n")
    env = {**os.environ, "HOROVOD_SIZE": str(ranks)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=common.REPO).stdout.split()
    expected = max(1, (os.cpu_count() or 2) // ranks)
    assert [int(v) for v in out[-3:]] == [expected] * 3


def test_recorded_script_is_the_path_the_command_names_at_its_commit():
    assert common.recorded_script({"command": ".venv/bin/python jobs/bench_scaling.py"},
                                  "benchmarks/bench_scaling.py") == "jobs/bench_scaling.py"
    meta = {"command": "HOROVOD_CYCLE_TIME=0.1 horovodrun --gloo -np 2 python "
                       "/home/u/dho2/benchmarks/bench_time_to_accuracy.py --quick"}
    assert common.recorded_script(meta, "x") == "benchmarks/bench_time_to_accuracy.py"
    assert common.recorded_script({"command": "python other.py"}, "default.py") == "default.py"
    assert common.recorded_script(None, "default.py") == "default.py"


def test_report_arguments_and_their_aliases():
    parser = argparse.ArgumentParser()
    common.add_report_arguments(parser, "bench_x", "no run", report_flags=("--out", "--report"),
                                render_flags=("--from-rows", "--render-only"))
    for flags in (["--report", "R.md", "--render-only", "r.json"],
                  ["--out", "R.md", "--from-rows", "r.json"]):
        args = parser.parse_args(flags)
        assert (args.report, args.render_only) == ("R.md", "r.json")
    assert vars(parser.parse_args([])) == {"report": None, "render_only": None}
    assert "bench_x section" in parser.format_help()


def test_publish_renders_the_saved_file_into_every_output(tmp_path, capsys):
    results = tmp_path / "sub" / "x_p1.json"
    common.save_results(results, {"meta": None, "values": (1, 2.5)})
    assert common.load_results(results) == {"meta": None, "values": [1, 2.5]}
    target = write(tmp_path, "a\n<!-- BEGIN bench_x_p1 -->\nold\n<!-- END bench_x_p1 -->\nb\n")
    seen = []

    def render(payload, shown):
        seen.append(shown)
        return f"values {payload['values']} from {shown}\n"

    text = common.publish(results, render, target, tmp_path / "out" / "x.md", show=True)
    assert text == f"values [1, 2.5] from {results}\n" and seen == [str(results)]
    assert common.read_section(target, "bench_x_p1") == text
    assert (tmp_path / "out" / "x.md").read_text() == text
    out = capsys.readouterr().out
    assert out.startswith(text) and f"wrote section bench_x_p1 of {target}" in out
    assert common.publish(results, render) == text and capsys.readouterr().out == ""
    inside = common.REPO / "results" / "bench_scaling.json"
    assert common.publish(inside, lambda payload, shown: shown) == "results/bench_scaling.json"
    assert common.publish(results, lambda p, s: str(p), load=lambda path: 7) == "7"


def test_machine_description_and_worker_launch():
    import horovod
    import tensorflow as tf

    described = common.machine(3)
    assert described["ranks"] == 3 and described["cores"] == os.cpu_count()
    assert (described["tensorflow"], described["horovod"]) == (tf.__version__,
                                                               horovod.__version__)
    assert described["cpu"] == common.cpu_model() and described["cpu"]
    assert common.machine_summary().startswith(f"{os.cpu_count()} CPU cores ({common.cpu_model()})")
    assert common.horovodrun_prefix(2)[1:] == ["--gloo", "-np", "2", "-H", "localhost:2"]
    assert Path(common.horovodrun_prefix(2)[0]).parent == Path(sys.executable).parent
    env = common.worker_environment(64)
    assert env["PYTHONPATH"] == str(common.REPO) and env["OMP_NUM_THREADS"] == "1"


def test_library_version_names_the_commit_and_changes_with_the_sources(tmp_path):
    (tmp_path / "dho2_tf").mkdir()
    (tmp_path / "dho2_tf" / "a.py").write_text("x = 1\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "a")
    head = common.git_commit(tmp_path)
    before = common.library_version(tmp_path)
    assert re.fullmatch(rf"{head[:7]}, dho2_tf sources sha1 [0-9a-f]{{10}}", before)
    (tmp_path / "dho2_tf" / "a.py").write_text("x = 2\n")
    after = common.library_version(tmp_path)
    assert after.split(", ")[0] == head[:7] and after != before
