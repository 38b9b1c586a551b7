"""Read the output of a ``horovodrun`` launch: one rank's lines, the lines of one run of
``tests/parallel/consistency_run.py job`` (which runs ``jobs/train.py`` several times in one
launch and marks where each run begins with ``rank R JOB_START I``), and the RESULT line of
``jobs/train.py``."""

from __future__ import annotations

import re
import subprocess


def rank_output(text: str, rank: int) -> list[str]:
    """The lines horovodrun prefixed with ``[rank]<stdout>:`` / ``<stderr>:``, prefix removed."""
    out = []
    for line in text.splitlines():
        for stream in ("stdout", "stderr"):
            prefix = f"[{rank}]<{stream}>:"
            if line.startswith(prefix):
                out.append(line[len(prefix):])
    return out


def job_lines(proc: subprocess.CompletedProcess, rank: int) -> list[str]:
    """Rank ``rank``'s lines of stdout and stderr, prefix removed."""
    return rank_output(proc.stdout, rank) + rank_output(proc.stderr, rank)


def run_lines(text: str, rank: int, index: int) -> list[str]:
    """Rank ``rank``'s lines of ``text`` from ``JOB_START index`` to the next run's start.

    Raises AssertionError (with the end of the output) when run ``index`` never started.
    """
    lines = rank_output(text, rank)
    start = f"rank {rank} JOB_START {index}"
    assert start in lines, f"run {index} did not start on rank {rank}:\n" + "\n".join(lines[-80:])
    begin = lines.index(start) + 1
    following = f"rank {rank} JOB_START {index + 1}"
    end = lines.index(following) if following in lines else len(lines)
    return lines[begin:end]


def result_line(proc: subprocess.CompletedProcess) -> dict[str, str]:
    """The RESULT summary of a ``jobs/train.py`` launch (printed once, by rank 0) as a dict."""
    lines = [line for line in proc.stdout.splitlines() if "RESULT " in line]
    assert len(lines) == 1, proc.stdout[-4000:]
    assert lines[0].startswith("[0]"), lines[0]
    return dict(re.findall(r"(\w+)=(\S+)", lines[0].split("RESULT ", 1)[1]))
