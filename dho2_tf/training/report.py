"""Generated sections of a Markdown report, and the provenance of a benchmark run.

A generated section is the text between two marker lines of a Markdown file::

    <!-- BEGIN bench_scaling -->
    ...generated text...
    <!-- END bench_scaling -->

:func:`replace_section` swaps that text for a new one and leaves every other byte of the file
as it was. Benchmark scripts record :func:`run_metadata` (command, commit, date) in the results
JSON they write and render their section from that JSON, so a section can be regenerated from
its JSON at any time; :func:`section_name` ties a results file to its section.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shlex
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
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


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path``, then rename it over ``path``."""
    mode = stat.S_IMODE(path.stat().st_mode)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
        _write_atomically(path, new)


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


def render_results_file(results: str | os.PathLike[str], report: str | os.PathLike[str] | None,
                        render: Callable[[dict[str, Any], str], str],
                        repo: str | os.PathLike[str] = REPO) -> str:
    """Render the section of an existing ``results`` json with ``render(payload, shown_path)``,
    print it and, when ``report`` is given, write it between its markers (no benchmark runs)."""
    payload = json.loads(Path(results).read_text(encoding="utf-8"))
    text = render(payload, display_path(results, repo))
    print(text)
    if report:
        print(f"wrote section {update_report(report, results, text)} of {report}")
    return text
