r"""Launch an elastic ``horovodrun`` job and fail loudly when it does not finish training.

``horovodrun`` alone can hang or end quietly after a worker is lost: it waits
``--elastic-timeout`` seconds (600 by default) for ``--min-np`` slots, and when the lost host
never returns it may stop the job without saying that training did not finish. This launcher

* passes ``--elastic-timeout`` (default 60 s) and the host-discovery script of this folder,
* sets ``DHO2_ELASTIC_DONE_FILE`` (rank 0 of :func:`dho2_tf.training.elastic.elastic_train`
  writes the final step there when training completes),
* streams the job's output, and exits 0 only when ``horovodrun`` did and training completed;
  otherwise it prints one ``run_elastic: error: ...`` line saying what happened (too few
  workers for the timeout after a loss, every survivor on a blacklisted host, or an early stop)
  and the last committed step, and exits non-zero.

Example (two names for this machine, one slot each; a lost worker is tolerated with
``--min-np 1``, with ``--min-np 2`` the job ends with a clear error after the timeout)::

    DHO2_ELASTIC_HOSTS="localhost:1 127.0.0.1:1" .venv/bin/python jobs/elastic/run_elastic.py \\
        --np 2 --min-np 1 --max-np 2 -- .venv/bin/python jobs/train_elastic.py --epochs 20
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
_COMMIT = re.compile(r"elastic commit: step=(\d+)")
_NO_SLOTS = "Timed out waiting for"
_ALL_BLACKLISTED = "blacklisted slots count"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Launcher flags; the training command follows ``--``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--np", type=int, required=True, help="workers to start with")
    p.add_argument("--min-np", type=int, required=True, help="fewest workers to keep training")
    p.add_argument("--max-np", type=int, required=True, help="most workers to use")
    p.add_argument("--elastic-timeout", type=int, default=60,
                   help="seconds to wait for --min-np slots after a loss before failing")
    p.add_argument("--discovery", default=str(HERE / "discover_hosts.sh"),
                   help="host-discovery script (default: discover_hosts.sh beside this file)")
    p.add_argument("--horovodrun", default=None, help="horovodrun executable")
    p.add_argument("--extra", action="append", default=[],
                   help="one more horovodrun argument (repeatable), e.g. --extra=--verbose")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the training command")
    args = p.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        p.error("the training command is missing (put it after --)")
    if not 1 <= args.min_np <= args.np <= args.max_np:
        p.error(f"need 1 <= --min-np <= --np <= --max-np. Received: min_np={args.min_np}, "
                f"np={args.np}, max_np={args.max_np}")
    if args.elastic_timeout < 1:
        p.error(f"--elastic-timeout must be positive. Received: {args.elastic_timeout}")
    return args


def horovodrun_command(args: argparse.Namespace) -> list[str]:
    """The ``horovodrun --gloo`` elastic command line for ``args``."""
    exe = args.horovodrun or str(Path(sys.executable).parent / "horovodrun")
    if not Path(exe).exists():
        exe = shutil.which("horovodrun") or exe
    return [exe, "--gloo", "-np", str(args.np), "--min-np", str(args.min_np),
            "--max-np", str(args.max_np), "--host-discovery-script", args.discovery,
            "--elastic-timeout", str(args.elastic_timeout), "--network-interface", "lo",
            *args.extra, *args.command]


def verdict(returncode: int, finished: bool, output: str, args: argparse.Namespace) -> str | None:
    """``None`` when the job finished training, else the error message to print."""
    commits = _COMMIT.findall(output)
    last = f"the last commit was at step {commits[-1]}" if commits else "no commit was made"
    if returncode == 0 and finished:
        return None
    if _NO_SLOTS in output:
        return (f"the elastic job stopped: after a worker was lost, fewer than --min-np "
                f"{args.min_np} workers were available for --elastic-timeout "
                f"{args.elastic_timeout}s (the lost host did not come back); {last}. Add hosts "
                f"or lower --min-np, then resume from a checkpoint.")
    if _ALL_BLACKLISTED in output:
        return (f"the elastic job stopped: every remaining worker ran on a host where a worker "
                f"failed (Horovod blacklists the whole host); {last}. Give each worker its own "
                f"host name, e.g. DHO2_ELASTIC_HOSTS=\"localhost:1 127.0.0.1:1\".")
    if returncode == 0:
        return (f"the elastic job ended without finishing training (no worker reported "
                f"completion); {last}.")
    return f"the elastic job failed (horovodrun exit status {returncode}); {last}."


def main(argv: list[str] | None = None) -> int:
    """Run the job, stream its output, and return the exit status (see the module docstring)."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dho2-elastic-") as tmp:
        done = Path(tmp) / "done"
        env = {**os.environ, "DHO2_ELASTIC_DONE_FILE": str(done)}
        proc = subprocess.Popen(horovodrun_command(args), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        lines = []
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            lines.append(line)
        returncode = proc.wait()
        message = verdict(returncode, done.exists(), "".join(lines), args)
    if message is None:
        return 0
    print(f"run_elastic: error: {message}", file=sys.stderr, flush=True)
    return returncode or 1


if __name__ == "__main__":
    sys.exit(main())
