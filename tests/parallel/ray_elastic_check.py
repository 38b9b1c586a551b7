"""``tests/parallel/elastic_train_check.py`` on Ray workers under Horovod Elastic.

:func:`elastic_check` runs that script's ``main`` with the given flags in this process (a Ray
worker started by :func:`dho2_tf.training.ray_launcher.run_elastic_function_on_ray`) and returns its
``ELASTIC_RESULT`` record, so that ``tests/test_parallel_ray.py`` checks a Ray run exactly like
the ``horovodrun`` runs of the same script. :class:`FixedHosts` makes one machine look like
several hosts to Horovod's elastic driver, which blacklists the host of a failed worker (the
``horovodrun`` elastic tests list ``localhost`` and ``127.0.0.1`` for the same reason); each of
its host names ``H`` must be a resource ``node:H`` of the local Ray instance, which is where
Horovod places that host's workers.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from typing import Any

from horovod.runner.elastic.discovery import HostDiscovery


class _Tee(io.TextIOBase):
    """A text stream writing to every stream it was given."""

    def __init__(self, *streams: Any) -> None:
        self._streams = streams

    def write(self, text: str) -> int:
        for stream in self._streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self._streams:
            stream.flush()


def elastic_check(argv: list[str]) -> dict[str, Any]:
    """Run ``elastic_train_check.py argv`` here; its ``ELASTIC_RESULT`` and ``HOROVOD_ELASTIC``.

    The script's output still goes to this process's stdout (Ray forwards it to the driver).
    """
    from tests.parallel import elastic_train_check

    captured = io.StringIO()
    saved = sys.argv
    sys.argv = ["elastic_train_check.py", *argv]
    try:
        with contextlib.redirect_stdout(_Tee(sys.stdout, captured)):
            elastic_train_check.main()
    finally:
        sys.argv = saved
    (line,) = [ln for ln in captured.getvalue().splitlines() if "ELASTIC_RESULT " in ln]
    result = json.loads(line.split("ELASTIC_RESULT ", 1)[1])
    return {**result, "horovod_elastic": os.environ.get("HOROVOD_ELASTIC")}


class FixedHosts(HostDiscovery):
    """Host discovery that always reports the same ``{host: slots}``."""

    def __init__(self, slots: dict[str, int]) -> None:
        super().__init__()
        self._slots = dict(slots)

    def find_available_hosts_and_slots(self) -> dict[str, int]:
        return dict(self._slots)
