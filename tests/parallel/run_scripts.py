"""Run under horovodrun: several check scripts of this folder, one after another, in the same
processes (one Horovod start-up for all of them).

Usage: ``run_scripts.py SCRIPT [ARG ...] [++ SCRIPT [ARG ...]] ...``. Each script runs as
``python SCRIPT ARG ...`` would (``__name__ == "__main__"``, ``sys.argv`` set); a script that
ends with ``sys.exit(0)`` (or returns) is followed by the next. Any other exit or exception ends
the launch, as it would have ended the script's own launch. Every rank prints
``RUN_SCRIPTS_DONE <script>`` after each script. A script that registers Horovod process sets
must come first (they are registered at start-up).
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    runs: list[list[str]] = [[]]
    for arg in sys.argv[1:]:
        if arg == "++":
            runs.append([])
        else:
            runs[-1].append(arg)
    for script, *args in runs:
        path = HERE / script
        sys.argv = [str(path), *args]
        try:
            runpy.run_path(str(path), run_name="__main__")
        except SystemExit as stop:
            if stop.code not in (0, None):
                raise
        print(f"RUN_SCRIPTS_DONE {script}", flush=True)


if __name__ == "__main__":
    main()
