"""Horovod Elastic's side of an elastic run: committed state, failure detection, the retry loop.

The run level (:mod:`dho2_tf.training.elastic`) decides what a commit holds and how training
continues; this module holds what talks to Horovod:

* :class:`CommittedState`: Horovod's ``ObjectState`` broadcasting through a communicator, whose
  ``sync`` turns a failed broadcast into ``HorovodInternalError`` (so survivors roll back);
* :func:`is_horovod_failure`: whether an error means a collective failed (a peer died or left);
* :func:`run_elastic`: ``hvd.elastic.run`` with that wider failure detection.

Note:
    Horovod's ``hvd.elastic.run`` turns only failed allreduce/allgather/broadcast ops into
    ``HorovodInternalError`` and silently returns ``None`` for a failed reduce-scatter, which is
    DHO2's gradient collective; a peer killed with SIGKILL also surfaces inside a traced step
    as a bare Gloo transport error (``Connection reset by peer ... node DHO2/dho2/gradient``).
    :func:`run_elastic` maps all of these to ``HorovodInternalError``.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from typing import Any

import tensorflow as tf
from horovod.common.elastic import ObjectState, run_fn
from horovod.common.exceptions import HorovodInternalError

from dho2_tf.distributed.comm import Communicator

logger = logging.getLogger(__name__)

_SHUT_DOWN = "Horovod has been shut down"
_HOROVOD_OPS = ("HorovodAllreduce", "HorovodAllgather", "HorovodBroadcast",
                "HorovodReducescatter", "HorovodAlltoall", _SHUT_DOWN)
#: What a collective reports when a peer process died (SIGKILL, OOM, lost host): the Gloo
#: transport's errors, which name neither the op type nor Horovod, e.g. ``Connection reset by
#: peer [[{{node DHO2/dho2/gradient}}]]``.
_TRANSPORT_FAILURES = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
                       "Connection refused", "gloo", "Gloo", "Read error", "Write error",
                       "Timed out waiting", "Socket closed")
#: TensorFlow error classes a failed collective surfaces as (eager or inside ``tf.function``).
_COLLECTIVE_ERRORS = (tf.errors.UnknownError, tf.errors.InternalError, tf.errors.AbortedError,
                      tf.errors.UnavailableError, tf.errors.DeadlineExceededError)

__all__ = ["CommittedState", "HorovodInternalError", "failure_summary", "is_horovod_failure",
           "run_elastic"]


def is_horovod_failure(error: BaseException) -> bool:
    """Whether an error means a Horovod collective failed (a peer died or left the job).

    True for Horovod's own ``HorovodInternalError`` and for a TensorFlow op error (eager or
    raised from inside a ``tf.function``) that names a Horovod op, says Horovod was shut down,
    or carries a transport failure of the Gloo controller, such as ``Connection reset by peer``
    after a peer was killed with SIGKILL (that message names only the graph node, e.g.
    ``DHO2/dho2/gradient``). Horovod's own ``hvd.elastic.run`` recognises only failed
    allreduce, allgather and broadcast ops and silently returns ``None`` on a failed
    reduce-scatter (DHO2's gradient collective), hence this wider check.
    """
    if isinstance(error, HorovodInternalError):
        return True
    if not isinstance(error, _COLLECTIVE_ERRORS):
        return False
    text = str(error)
    return any(token in text for token in _HOROVOD_OPS + _TRANSPORT_FAILURES)


def failure_summary(error: BaseException) -> str:
    """The first line of ``error`` that names the failed op or transport (200 characters)."""
    lines = [re.sub(r"^\s*\[[^\]]*\]:?\s*", "", ln)  # drop a "[file.cc:123]" prefix
             for ln in str(error).splitlines()
             if any(t in ln for t in _HOROVOD_OPS + _TRANSPORT_FAILURES)]
    return (lines or [str(error)])[0].strip()[:200]


class CommittedState(ObjectState):
    """Horovod's ``ObjectState`` over a communicator: ``commit()`` keeps the attributes,
    ``restore()`` rolls them back, ``sync()`` broadcasts rank 0's commit.

    Args:
        comm: communicator used for the broadcasts (rank 0 is the root).
        **attributes: the initial attributes.
    """

    def __init__(self, comm: Communicator, **attributes: Any) -> None:
        bcast = functools.partial(comm.broadcast_object, root=0, name="dho2/elastic/state")
        super().__init__(bcast_object=bcast, get_rank=lambda: comm.rank, **attributes)

    def sync(self) -> None:
        """Broadcast rank 0's commit; a peer lost meanwhile is a ``HorovodInternalError``."""
        try:
            super().sync()
        except HorovodInternalError:
            raise
        except Exception as err:  # noqa: BLE001 -- re-raised unless it is a failed collective
            if not is_horovod_failure(err):
                raise
            raise HorovodInternalError(err) from err

    def keep(self) -> None:
        """Record the current attributes as the commit, without the subclass's ``save`` hook."""
        ObjectState.save(self)

    def saved(self, key: str) -> Any:
        """The committed value of attribute ``key``."""
        return self._saved_state[key]


def run_elastic(body: Callable[..., Any],
                on_failure: Callable[[Any, BaseException], None]) -> Callable[..., Any]:
    """``hvd.elastic.run(body)`` whose failure detection also covers reduce-scatter and
    transport errors: such an error calls ``on_failure(state, error)`` (e.g. to log it) and
    becomes ``HorovodInternalError``, so Horovod restores the last commit and re-enters."""
    import horovod.tensorflow as hvd

    @functools.wraps(body)
    def guarded(state: Any, *args: Any) -> Any:
        try:
            return body(state, *args)
        except HorovodInternalError:
            raise
        except Exception as err:  # noqa: BLE001 -- re-raised unless it is a failed collective
            if not is_horovod_failure(err):
                raise
            on_failure(state, err)
            raise HorovodInternalError(err) from err

    def reset() -> None:
        hvd.shutdown()
        hvd.init()

    return run_fn(guarded, reset)
