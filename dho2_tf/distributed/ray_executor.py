"""Horovod's Ray executor, imported only when a job runs on Ray (the optional Ray extra)."""

from __future__ import annotations

import os
from typing import Any

RAY_EXTRA = "pip install '.[ray]'"
MISSING_RAY = ("The Ray launcher needs Ray and horovod.ray ({error}). Install the project's Ray "
               "extra from the repository root: `{extra}` (ray==2.9.3, protobuf<5).")


def require_ray() -> tuple[Any, Any]:
    """``(ray, horovod.ray.RayExecutor)``.

    Raises:
        ImportError: naming the Ray extra to install when either import fails.
    """
    # Every line of every rank, as under horovodrun (Ray would fold similar lines of
    # different workers into one); read when ray is first imported.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        import ray
        from horovod.ray import RayExecutor
    except ImportError as err:
        raise ImportError(MISSING_RAY.format(error=err, extra=RAY_EXTRA)) from err
    return ray, RayExecutor
