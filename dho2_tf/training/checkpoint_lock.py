"""One run per checkpoint directory: a lock file naming the host and process that hold it.

``directory/checkpoint.lock`` holds ``{"host", "pid", "since"}``. It is created exclusively
(``O_CREAT | O_EXCL``) by the process that writes the checkpoints (rank 0) before it touches
the directory and removed when its run ends. A lock whose process is dead on this host is
stale (the run was killed) and is taken over with a warning; a lock held by a live process,
or by a process on another host (whose liveness cannot be checked from here), refuses the run
with :class:`CheckpointError` (also importable from :mod:`dho2_tf.training.checkpointing`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

logger = logging.getLogger(__name__)

LOCK = "checkpoint.lock"


class CheckpointError(ValueError):
    """A checkpoint directory or file cannot be used as asked (the message says what to do)."""


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (signal 0 probes without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def _read_holder(path: str) -> dict | None:
    """The lock's ``{"host", "pid", "since"}``, or None when it vanished or is unreadable."""
    try:
        with open(path, encoding="utf-8") as handle:
            holder = json.load(handle)
        return holder if isinstance(holder, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def acquire_lock(directory: str) -> None:
    """Hold ``directory``'s lock for this process (re-entrant: a lock it already holds is fine).

    Raises:
        CheckpointError: when another live process (or a process on another host) holds it;
            the message names the host, pid and lock file, and what to do.
    """
    path = os.path.join(directory, LOCK)
    host, pid = socket.gethostname(), os.getpid()
    for _ in range(3):  # a stale lock removed between our attempts: try again
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            fd = None
        except OSError as err:
            raise CheckpointError(f"The checkpoint directory {directory} is not writable "
                                  f"({err.strerror or err}). Fix its permissions or choose "
                                  "another --checkpoint-dir.") from None
        if fd is None:
            holder = _read_holder(path)
            if holder is None:
                continue
            if holder.get("host") == host and holder.get("pid") == pid:
                return
            if holder.get("host") == host and isinstance(holder.get("pid"), int) \
                    and not _pid_alive(holder["pid"]):
                logger.warning("Removing the stale lock %s of process %d on %s, which is no "
                               "longer running.", path, holder["pid"], host)
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass
                continue
            raise CheckpointError(
                f"The checkpoint directory {directory} is in use by another run (lock "
                f"{path}: host {holder.get('host')!r}, pid {holder.get('pid')!r}). Two runs "
                "on one directory would delete each other's checkpoints: wait for that run "
                "to finish or choose another --checkpoint-dir. If that run is gone (its host "
                f"crashed), delete {path}.") from None
        else:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump({"host": host, "pid": pid, "since": time.time()}, handle)
            return
    raise CheckpointError(f"Could not take the lock {path}: it keeps changing. Is another "
                          "run starting on the same --checkpoint-dir?")


def release_lock(directory: str) -> None:
    """Remove ``directory``'s lock if this process holds it (anything else is left alone)."""
    path = os.path.join(directory, LOCK)
    holder = _read_holder(path)
    if holder and holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid():
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
