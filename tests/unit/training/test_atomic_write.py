"""write_text_atomically: the whole new text or the old file, and the permission bits chosen."""

from __future__ import annotations

import os
import stat

import pytest

from dho2_tf.training import atomic_write
from dho2_tf.training.atomic_write import NEW_FILE_MODE, write_text_atomically


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_file_replaced_file_and_explicit_mode(tmp_path):
    path = tmp_path / "report.md"
    write_text_atomically(path, "first\r\nline\n")
    assert path.read_bytes() == b"first\r\nline\n" and _mode(path) == NEW_FILE_MODE
    path.chmod(0o600)
    write_text_atomically(str(path), "second ✓\n")
    assert path.read_text(encoding="utf-8") == "second ✓\n" and _mode(path) == 0o600
    write_text_atomically(path, "third\n", mode=0o640)
    assert path.read_text() == "third\n" and _mode(path) == 0o640
    assert sorted(os.listdir(tmp_path)) == ["report.md"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.json"
    path.write_text("old\n")

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic_write.os, "fsync", no_space)
    with pytest.raises(OSError, match="No space left"):
        write_text_atomically(path, "new\n")
    assert path.read_text() == "old\n" and sorted(os.listdir(tmp_path)) == ["checkpoint.json"]
