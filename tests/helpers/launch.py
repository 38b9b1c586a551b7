"""Launch a script under real ``horovodrun --gloo`` processes and fail loudly on error or hang."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def horovodrun_path() -> str:
    """The ``horovodrun`` next to the running interpreter (the project venv)."""
    candidate = Path(sys.executable).parent / "horovodrun"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("horovodrun")
    if found is None:
        raise RuntimeError("horovodrun not found: run `make setup` (scripts/setup_env.sh) first.")
    return found


def run_horovod(script: str | Path, np: int, args: tuple[str, ...] = (), timeout: float = 300,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``horovodrun --gloo -np np -H localhost:np python script *args``.

    Returns the completed process; raises AssertionError (with both ranks' output) on a
    non-zero exit and on a timeout, so a hang is a test failure, never a skip.
    """
    cmd = [horovodrun_path(), "--gloo", "-np", str(np), "-H", f"localhost:{np}",
           sys.executable, str(script), *args]
    full_env = dict(os.environ)
    full_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO)] + ([full_env["PYTHONPATH"]] if full_env.get("PYTHONPATH") else []))
    full_env.update(env or {})
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"")
        out = out.decode() if isinstance(out, bytes) else out
        raise AssertionError(f"horovodrun timed out after {timeout}s: {cmd}\n{out[-6000:]}")
    if proc.returncode != 0:
        raise AssertionError(
            f"horovodrun exited {proc.returncode}: {' '.join(cmd)}\n"
            f"--- stdout ---\n{proc.stdout[-8000:]}\n--- stderr ---\n{proc.stderr[-8000:]}")
    return proc
