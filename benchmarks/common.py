"""What every benchmark script shares: the machine description, the provenance of a run, and
the generated sections of a Markdown report with the ``--report`` / ``--render-only`` options
that write them.

A generated section is the text between two marker lines of a Markdown file::

    <!-- BEGIN bench_scaling -->
    ...generated text...
    <!-- END bench_scaling -->

:func:`replace_section` swaps that text for a new one and leaves every other byte of the file
as it was. A benchmark script records :func:`run_metadata` (command, commit, date) in the
results JSON it writes (:func:`save_results`) and renders its section from that JSON
(:func:`publish`), so a section can be regenerated from its JSON at any time
(``--render-only``); :func:`section_name` ties a results file to its section.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NAME = re.compile(r"[A-Za-z0-9_.:/-]+")
GIT_TIMEOUT_SECONDS = 30


def markers(name: str) -> tuple[str, str]:
    """The BEGIN and END marker lines (without line ending) of section ``name``."""
    if not NAME.fullmatch(name):
        raise ValueError(f"section name must match {NAME.pattern}. Received: {name!r}")
    return f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"


def _read(path: Path) -> str:
    """The file's text with its line endings untouched."""
    with open(path, encoding="utf-8", newline="") as handle:
        return handle.read()


def _marker_lines(lines: list[str], marker: str) -> list[int]:
    """Indices of the lines that consist of ``marker`` (surrounding whitespace ignored)."""
    return [i for i, line in enumerate(lines) if line.strip() == marker]


def _locate(text: str, name: str, path: Path) -> tuple[int, int]:
    """Character offsets of the section body: just after the BEGIN line, at the END line.

    Raises ``ValueError`` naming ``path`` and every missing, duplicated or misordered marker.
    """
    begin, end = markers(name)
    lines = text.splitlines(keepends=True)
    found = {marker: _marker_lines(lines, marker) for marker in (begin, end)}
    problems = []
    for marker, where in found.items():
        if not where:
            problems.append(f"{marker!r} is missing")
        elif len(where) > 1:
            numbers = ", ".join(str(i + 1) for i in where)
            problems.append(f"{marker!r} appears {len(where)} times (lines {numbers})")
    if not problems and found[end][0] < found[begin][0]:
        problems.append(f"{end!r} (line {found[end][0] + 1}) comes before {begin!r} "
                        f"(line {found[begin][0] + 1})")
    if problems:
        raise ValueError(f"{path}: cannot find section {name!r}: " + "; ".join(problems))
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    return offsets[found[begin][0] + 1], offsets[found[end][0]]


def read_section(path: str | os.PathLike[str], name: str) -> str:
    """The text between the markers of section ``name`` in ``path`` (``ValueError`` if the
    markers are missing, duplicated or out of order)."""
    path = Path(path)
    text = _read(path)
    start, stop = _locate(text, name, path)
    return text[start:stop]


def replace_section(path: str | os.PathLike[str], name: str, text: str) -> None:
    """Replace the text between the marker lines of section ``name`` in ``path`` by ``text``.

    The marker lines and everything outside them stay byte-identical; ``text`` gets a final
    newline if it lacks one (so the END marker stays on its own line). The file is replaced
    atomically (temporary file in the same directory, then ``os.replace``). Raises
    ``ValueError`` naming the file and the marker(s) when a marker is missing, appears more
    than once, or END comes before BEGIN; the file is then left untouched.
    """
    path = Path(path)
    old = _read(path)
    start, stop = _locate(old, name, path)
    body = text if text == "" or text.endswith("\n") else text + "\n"
    new = old[:start] + body + old[stop:]
    if new != old:
        # imported here: the library imports TensorFlow, which the report scripts need not
        from dho2_tf.training.atomic_write import write_text_atomically

        write_text_atomically(path, new)


def git_commit(repo: str | os.PathLike[str] = REPO) -> str:
    """``git rev-parse HEAD`` of ``repo``, plus ``+dirty`` when a tracked file has uncommitted
    changes; ``unknown`` when git or the repository is unavailable."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True,
                              check=True, timeout=GIT_TIMEOUT_SECONDS).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        changes = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if changes else "")


def horovod_launcher(environ: Mapping[str, str] | None = None) -> list[str]:
    """The ``horovodrun`` prefix equivalent to the current launch, or ``[]`` for one process.

    A process started by ``horovodrun`` cannot see that command line, so it is rebuilt from the
    environment Horovod sets: ``HOROVOD_SIZE`` ranks, Gloo if a Gloo rendezvous is set,
    ``-H localhost:N`` when every rank is local, and ``HOROVOD_CYCLE_TIME`` when set.
    """
    env = os.environ if environ is None else environ
    size = int(env.get("HOROVOD_SIZE", "1"))
    if size <= 1:
        return []
    prefix = [f"HOROVOD_CYCLE_TIME={env['HOROVOD_CYCLE_TIME']}"] \
        if env.get("HOROVOD_CYCLE_TIME") else []
    prefix.append("horovodrun")
    if env.get("HOROVOD_GLOO_RENDEZVOUS_ADDR"):
        prefix.append("--gloo")
    prefix += ["-np", str(size)]
    if env.get("HOROVOD_LOCAL_SIZE") == str(size):
        prefix += ["-H", f"localhost:{size}"]
    return prefix


def share_cores_between_ranks(environ: Mapping[str, str] | None = None) -> int:
    """Give each of the ``P = HOROVOD_SIZE`` ranks ``max(1, ⌊cores / P⌋)`` TensorFlow threads.

    Benchmarks call this before the first TensorFlow op (a communicator's start-up runs
    collectives, after which TensorFlow refuses to change its thread pools), so P ranks on one
    machine do not oversubscribe its cores. Returns the thread count set (intra- and inter-op).
    """
    import tensorflow as tf

    env = os.environ if environ is None else environ
    threads = max(1, (os.cpu_count() or 2) // max(1, int(env.get("HOROVOD_SIZE", "1"))))
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    return threads


def run_metadata(argv: Sequence[str] | None = None, repo: str | os.PathLike[str] = REPO,
                 launcher: Sequence[str] = ()) -> dict[str, str]:
    """Provenance of a run: ``command``, ``commit`` and ``date``.

    ``command`` is ``launcher`` + ``python`` + ``argv`` (default ``sys.argv``: the script as
    typed and its arguments), joined with :func:`shlex.join`; ``commit`` is
    :func:`git_commit` of ``repo`` (the repository of the benchmark scripts by default);
    ``date`` is the current UTC time in ISO-8601, to the second.
    """
    args = list(sys.argv if argv is None else argv)
    now = datetime.datetime.now(datetime.timezone.utc)
    return {"command": shlex.join([*launcher, "python", *args]), "commit": git_commit(repo),
            "date": now.isoformat(timespec="seconds")}


def section_name(results: str | os.PathLike[str]) -> str:
    """The report section of a results file: its stem, prefixed by ``bench_`` if it lacks it
    (``results/curvature_cost_p2.json`` → ``bench_curvature_cost_p2``)."""
    stem = Path(results).stem
    return stem if stem.startswith("bench_") else f"bench_{stem}"


def display_path(path: str | os.PathLike[str], repo: str | os.PathLike[str] = REPO) -> str:
    """``path`` relative to ``repo`` when it lies inside it (POSIX form), else as given."""
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(Path(repo).resolve()).as_posix()
    except ValueError:
        return str(path)


def short_commit(commit: str) -> str:
    """A commit for humans: 7 hex digits, plus the ``+dirty`` mark if present."""
    head, dirty, _ = commit.partition("+dirty")
    if not re.fullmatch(r"[0-9a-f]{8,40}", head):
        return commit
    return head[:7] + ("+dirty" if dirty else "")


def provenance_lines(meta: Mapping[str, Any] | None, results: str,
                     wall_seconds: float | None = None) -> list[str]:
    """Markdown bullets naming the command, commit, date and results file of a run.

    ``meta`` is a :func:`run_metadata` dict (``backfilled: true`` when it was added after the
    run); ``None`` when the results file records none.
    """
    if not meta:
        return ["- Command, commit and date: not recorded",
                f"- Results: `{results}`"]
    commit = short_commit(str(meta.get("commit", "unknown")))
    when = f"{commit}, {meta.get('date', 'unknown')}"
    if wall_seconds is not None:
        when += f", wall time {wall_seconds:.0f} s"
    note = " (metadata backfilled after the run)" if meta.get("backfilled") else ""
    return [f"- Command: `{meta.get('command', 'unknown')}`",
            f"- Commit and date: {when}",
            f"- Results: `{results}`{note}"]


def check_report(report: str | os.PathLike[str], results: str | os.PathLike[str]) -> None:
    """Raise ``ValueError`` now if ``report`` lacks the markers of the section of ``results``
    (run before a long benchmark, so a bad report file fails it at once)."""
    read_section(report, section_name(results))


def update_report(report: str | os.PathLike[str], results: str | os.PathLike[str],
                  text: str) -> str:
    """Write ``text`` into the section of ``results`` in ``report``; returns the section name."""
    name = section_name(results)
    replace_section(report, name, text)
    return name


def add_report_arguments(parser: argparse.ArgumentParser, section: str, skipped: str,
                         report_flags: Sequence[str] = ("--report",),
                         render_flags: Sequence[str] = ("--render-only",)) -> None:
    """The ``--report`` and ``--render-only`` options (``args.report``, ``args.render_only``).

    ``section`` names the section the script writes (e.g. ``bench_scaling``), ``skipped`` what
    ``--render-only`` does not do (e.g. ``no training``); ``report_flags`` and ``render_flags``
    are the option strings, aliases included.
    """
    parser.add_argument(*report_flags, dest="report", default=None,
                        help=f"Markdown file whose {section} section to replace "
                             "(e.g. BENCHMARKS.md)")
    parser.add_argument(*render_flags, dest="render_only", default=None, metavar="JSON",
                        help=f"render this results file ({skipped}); with --report, into it")


def save_results(path: str | os.PathLike[str], payload: Any) -> None:
    """Write ``payload`` as indented JSON to ``path`` (its folder created if missing)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=1, default=str) + "\n", encoding="utf-8")


def load_results(path: str | os.PathLike[str]) -> Any:
    """The JSON of a results file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def publish(results: str | os.PathLike[str], render: Callable[[Any, str], str],
            report: str | os.PathLike[str] | None = None,
            output_md: str | os.PathLike[str] | None = None, show: bool = False,
            load: Callable[[str | os.PathLike[str]], Any] = load_results) -> str:
    """Render the results file ``results`` as saved and write the text where it is asked for.

    The text is ``render(load(results), shown)``, ``shown`` being the file's path relative to
    the repository (:func:`display_path`); it is printed with ``show`` (``--render-only``),
    written to ``output_md`` if given, and between the markers of the file's section in
    ``report`` if given (:func:`update_report`). Returns the text.
    """
    text = render(load(results), display_path(results))
    if show:
        print(text)
    if output_md:
        Path(output_md).parent.mkdir(parents=True, exist_ok=True)
        Path(output_md).write_text(text, encoding="utf-8")
    if report:
        print(f"wrote section {update_report(report, results, text)} of {report}", flush=True)
    return text


SCRIPT = re.compile(r"(?:.*/)?((?:jobs|benchmarks)/bench_\w+\.py)")


def recorded_script(meta: Mapping[str, Any] | None, default: str) -> str:
    """The benchmark script of a run as its recorded command names it (the path it had at the
    run's commit, relative to the repository), or ``default`` when the command names none."""
    for word in shlex.split(str((meta or {}).get("command", ""))):
        found = SCRIPT.fullmatch(word)
        if found:
            return found.group(1)
    return default


def library_version(repo: str | os.PathLike[str] = REPO) -> str:
    """Short git commit plus a hash of the ``dho2_tf`` sources a run imports (edits show up)."""
    repo = Path(repo)
    commit = short_commit(git_commit(repo))
    digest = hashlib.sha1()
    for path in sorted((repo / "dho2_tf").rglob("*.py")):
        digest.update(path.relative_to(repo).as_posix().encode() + path.read_bytes())
    return f"{commit.partition('+')[0]}, dho2_tf sources sha1 {digest.hexdigest()[:10]}"


def cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo``; ``platform`` where that is missing)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_summary() -> str:
    """One line describing the host: cores, processor, operating system."""
    return (f"{os.cpu_count()} CPU cores ({cpu_model()}), "
            f"{platform.system()} {platform.release()}")


def software_versions() -> dict[str, str]:
    """The Python, TensorFlow and Horovod versions of the run."""
    import horovod
    import tensorflow as tf

    return {"python": platform.python_version(), "tensorflow": tf.__version__,
            "horovod": horovod.__version__}


def machine(ranks: int) -> dict[str, Any]:
    """What the numbers were measured on: processor, cores, ``ranks``, software, platform and
    the Horovod cycle time."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "ranks": ranks,
            **software_versions(), "platform": platform.platform(),
            "horovod_cycle_time_ms": os.environ.get("HOROVOD_CYCLE_TIME", "default (1)")}


def horovodrun_prefix(ranks: int) -> list[str]:
    """``horovodrun --gloo -np P -H localhost:P`` (the ``horovodrun`` next to this Python)."""
    horovodrun = Path(sys.executable).parent / "horovodrun"
    return [str(horovodrun), "--gloo", "-np", str(ranks), "-H", f"localhost:{ranks}"]


def worker_environment(ranks: int) -> dict[str, str]:
    """The environment of a benchmark worker at P = ``ranks`` on this machine: the repository
    importable, TensorFlow's start-up logs off, ``⌊cores / P⌋`` OpenMP threads per rank."""
    return {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2",
            "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // ranks))}
