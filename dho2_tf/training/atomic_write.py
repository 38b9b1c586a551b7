"""Replace a file's content atomically: a reader sees the old text or the new, never a part.

The text goes to a temporary file in the same directory, which is flushed, fsynced and then
renamed over the target with ``os.replace`` (atomic on POSIX within one file system). The
checkpoint manifest and the benchmarks' reports are written this way.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile

NEW_FILE_MODE = 0o644


def write_text_atomically(path: str | os.PathLike[str], text: str,
                          mode: int | None = None) -> None:
    """Replace ``path`` (or create it) with ``text`` (UTF-8, newlines written as given).

    Args:
        path: the file to replace.
        text: its new content.
        mode: permission bits of the new file; ``None`` keeps those of the file being replaced
            (:data:`NEW_FILE_MODE` when there is none).

    On any error the temporary file is removed and ``path`` is left as it was.
    """
    path = os.fspath(path)
    if mode is None:
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            mode = NEW_FILE_MODE
    folder, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(dir=folder or ".", prefix=f".{name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
