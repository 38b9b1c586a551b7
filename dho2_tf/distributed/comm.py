"""Communicators: the only place in dho2_tf that talks to Horovod.

Every collective the optimizer, the curvature estimator or the prioritized sampler needs goes
through one small interface, :class:`Communicator`, so that the maths runs unchanged in one process
(:class:`LocalComm`) and across Horovod ranks (:class:`HorovodComm`).

Conventions:

* ``op`` is ``"sum"`` or ``"mean"``.
* ``process_set`` is ``None`` (all ranks) or a :class:`Group` built by :meth:`Communicator.group`.
* ``name`` is a deterministic string (``"dho2/<purpose>"``); ranks match collectives by name, so
  every rank must issue the same collectives, with the same names, in the same order. No
  collective may sit under a rank-dependent ``if``.
* ``reducescatter`` splits dimension 0 into ``size`` equal parts (callers pad, see
  :mod:`dho2_tf.distributed.sharding`); ``allgather`` concatenates along dimension 0.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping, Sequence

import tensorflow as tf

from dho2_tf.consistency import RunConsistencyError, check_run_consistency, flatten_config

logger = logging.getLogger(__name__)

_OPS = ("sum", "mean")


@dataclasses.dataclass(frozen=True)
class Group:
    """A fixed set of global ranks that collectives can be restricted to.

    Attributes:
        ranks: sorted global ranks of the members.
        handle: the backend's object (a ``horovod.tensorflow.ProcessSet``) or ``None`` locally.
    """

    ranks: tuple[int, ...]
    handle: Any = dataclasses.field(default=None, compare=False, repr=False)

    def size(self) -> int:
        """Number of members."""
        return len(self.ranks)

    def includes(self, global_rank: int) -> bool:
        """Whether ``global_rank`` is a member."""
        return global_rank in self.ranks

    def rank_of(self, global_rank: int) -> int:
        """Rank of ``global_rank`` inside the group (its index in ``ranks``)."""
        return self.ranks.index(global_rank)


def _check_op(op: str) -> None:
    if op not in _OPS:
        raise ValueError(f"`op` must be one of {_OPS}. Received: op={op!r}")


class Communicator:
    """Interface shared by :class:`LocalComm` and :class:`HorovodComm`.

    Attributes:
        rank: this process's global rank.
        size: number of ranks.
    """

    rank: int = 0
    size: int = 1

    @property
    def is_root(self) -> bool:
        """True on global rank 0, the only rank that logs and writes files."""
        return self.rank == 0

    def group_size(self, process_set: Group | None) -> int:
        """Size of ``process_set`` (all ranks when ``None``)."""
        return self.size if process_set is None else process_set.size()

    def group_rank(self, process_set: Group | None) -> int:
        """This process's rank inside ``process_set`` (global rank when ``None``)."""
        return self.rank if process_set is None else process_set.rank_of(self.rank)

    # Collectives: subclasses implement these five.
    def allreduce(self, x: tf.Tensor, op: str = "sum", *, name: str,
                  process_set: Group | None = None) -> tf.Tensor:
        """Element-wise sum (or mean) of ``x`` over the ranks of ``process_set``."""
        raise NotImplementedError

    def grouped_allreduce(self, xs: Sequence[tf.Tensor], op: str = "sum", *, name: str,
                          process_set: Group | None = None) -> list[tf.Tensor]:
        """:meth:`allreduce` of several tensors in one fused collective."""
        raise NotImplementedError

    def reducescatter(self, x: tf.Tensor, op: str = "sum", *, name: str,
                      process_set: Group | None = None) -> tf.Tensor:
        """Reduce over ranks, then keep block ``group_rank`` of ``size`` equal dim-0 blocks."""
        raise NotImplementedError

    def allgather(self, x: tf.Tensor, *, name: str,
                  process_set: Group | None = None) -> tf.Tensor:
        """Concatenate every rank's ``x`` along dimension 0, in rank order."""
        raise NotImplementedError

    def broadcast(self, x: tf.Tensor, root: int = 0, *, name: str,
                  process_set: Group | None = None) -> tf.Tensor:
        """``x`` of global rank ``root`` (which must be in ``process_set``) on every member."""
        raise NotImplementedError

    def alltoall(self, x: tf.Tensor, splits: Sequence[int], *, name: str,
                 process_set: Group | None = None) -> tf.Tensor:
        """Send rows ``splits[j]`` of ``x`` to member j; returns the concatenated receipts."""
        raise NotImplementedError

    # Python-object helpers (eager only).
    def broadcast_object(self, obj: Any, root: int = 0, *, name: str) -> Any:
        """A picklable object of global rank ``root`` on every rank."""
        raise NotImplementedError

    def allgather_object(self, obj: Any, *, name: str) -> list[Any]:
        """List of every rank's picklable object, in rank order."""
        raise NotImplementedError

    def barrier(self, name: str = "dho2/barrier") -> None:
        """Return only once every rank has reached the barrier."""
        self.allreduce(tf.zeros([1]), "sum", name=name)

    def group(self, ranks: Sequence[int]) -> Group:
        """A :class:`Group` over ``ranks`` (global ranks, registered at start-up)."""
        raise NotImplementedError

    def data_parallel_optimizer(self, optimizer: Any) -> Any:
        """A first-order Keras optimizer whose gradients are averaged over all ranks."""
        raise NotImplementedError


class LocalComm(Communicator):
    """One process: every collective is the identity (a group can only be ``[0]``)."""

    def __init__(self) -> None:
        self.rank = 0
        self.size = 1

    def __repr__(self) -> str:
        return "LocalComm()"

    def allreduce(self, x, op="sum", *, name, process_set=None):
        _check_op(op)
        return tf.identity(x)

    def grouped_allreduce(self, xs, op="sum", *, name, process_set=None):
        _check_op(op)
        return [tf.identity(x) for x in xs]

    def reducescatter(self, x, op="sum", *, name, process_set=None):
        _check_op(op)
        return tf.identity(x)

    def allgather(self, x, *, name, process_set=None):
        return tf.identity(x)

    def broadcast(self, x, root=0, *, name, process_set=None):
        if root != 0:
            raise ValueError(f"`root` must be 0 in a single process. Received: root={root}")
        return tf.identity(x)

    def alltoall(self, x, splits, *, name, process_set=None):
        return tf.identity(x)

    def broadcast_object(self, obj, root=0, *, name):
        return obj

    def allgather_object(self, obj, *, name):
        return [obj]

    def barrier(self, name="dho2/barrier"):
        return None

    def data_parallel_optimizer(self, optimizer):
        return optimizer

    def group(self, ranks):
        ranks = tuple(sorted(int(r) for r in ranks))
        if ranks != (0,):
            raise ValueError(f"A single process can only form the group [0]. Received: {ranks}")
        return Group(ranks)


_REGISTERED_SETS: dict[tuple[int, ...], Any] = {}


class HorovodComm(Communicator):
    """Horovod collectives (Gloo or MPI); call after ``hvd.init`` or let it call ``hvd.init``.

    When this constructor starts Horovod, the ranks first compare the process sets each wants
    (Horovod's static process sets must be identical on every rank at ``hvd.init``; ranks that
    disagree would otherwise stop inside Horovod's start-up with a Gloo error): Horovod starts
    without sets, one ``allgather_object`` compares them, and only if they agree and are not
    empty does Horovod restart with them registered. Every rank takes part, with or without
    sets. Under Horovod Elastic (``HOROVOD_ELASTIC=1``) no collective may run outside the
    elastic loop, so Horovod starts directly (elastic runs use no process sets).

    That comparison is a TensorFlow op, so it starts TensorFlow's runtime: set thread pools
    (``tf.config.threading``) and visible devices before the first ``HorovodComm`` (or call
    ``hvd.init`` yourself, configure TensorFlow, then create it; then nothing is compared).

    Args:
        process_sets: groups of global ranks to register at initialisation (Horovod needs every
            process set before the first collective). Each must be a non-empty proper subset of
            the ranks; the same list must be passed on every rank.
        requested_by: flat ``{setting: value}`` the sets were derived from (e.g. the DHO2
            ``mode`` and ``curvature_ranks``), named in the error when ranks disagree.

    Raises:
        dho2_tf.consistency.RunConsistencyError: on every rank, when the ranks want different
            process sets (Horovod is shut down again first); the message names each rank's
            sets and the differing ``requested_by`` settings.
    """

    def __init__(self, process_sets: Sequence[Sequence[int]] = (),
                 requested_by: Mapping[str, Any] | None = None) -> None:
        import horovod.tensorflow as hvd  # the only Horovod import in dho2_tf

        self._hvd = hvd
        self._sets = _REGISTERED_SETS
        wanted = [tuple(sorted(int(r) for r in ranks)) for ranks in process_sets]
        if not hvd.is_initialized():
            if os.environ.get("HOROVOD_ELASTIC") == "1":
                self._start(wanted)
            else:
                self._start_agreed(wanted, requested_by or {})
        elif any(w not in _REGISTERED_SETS for w in wanted):
            raise RuntimeError(
                "Horovod is already initialised; process sets must be registered at hvd.init. "
                "Create the first HorovodComm with every process set the run needs "
                f"(missing: {[list(w) for w in wanted if w not in _REGISTERED_SETS]}).")
        self.refresh()

    def _start(self, wanted: list[tuple[int, ...]]) -> None:
        """``hvd.init`` registering ``wanted`` (the same on every rank)."""
        handles = [self._hvd.ProcessSet(list(r)) for r in wanted]
        self._hvd.init(process_sets=handles or None)
        _REGISTERED_SETS.clear()
        _REGISTERED_SETS.update(zip(wanted, handles))

    def _start_agreed(self, wanted: list[tuple[int, ...]],
                      requested_by: Mapping[str, Any]) -> None:
        """Start Horovod without sets, compare ``wanted`` across ranks, restart with them."""
        self._start([])
        self.refresh()
        try:
            check_run_consistency(self, {"process_sets": [list(r) for r in wanted]},
                                  what="Horovod start-up", context=flatten_config(requested_by))
        except RunConsistencyError:
            self._hvd.shutdown()  # a later HorovodComm starts (and compares) afresh
            raise
        if wanted:  # identical on every rank now: every rank restarts, or none does
            self._hvd.shutdown()
            self._start(wanted)

    def __repr__(self) -> str:
        return f"HorovodComm(rank={self.rank}, size={self.size}, groups={list(self._sets)})"

    def refresh(self) -> None:
        """Re-read rank and size (after Horovod Elastic re-initialised with new membership)."""
        self.rank = self._hvd.rank()
        self.size = self._hvd.size()

    def _ps(self, process_set: Group | None):
        return self._hvd.global_process_set if process_set is None else process_set.handle

    def _op(self, op: str):
        _check_op(op)
        return self._hvd.Sum if op == "sum" else self._hvd.Average

    def allreduce(self, x, op="sum", *, name, process_set=None):
        return self._hvd.allreduce(x, op=self._op(op), name=name,
                                   process_set=self._ps(process_set))

    def grouped_allreduce(self, xs, op="sum", *, name, process_set=None):
        if not xs:
            return []
        return list(self._hvd.grouped_allreduce(list(xs), op=self._op(op), name=name,
                                                process_set=self._ps(process_set)))

    def reducescatter(self, x, op="sum", *, name, process_set=None):
        return self._hvd.reducescatter(x, op=self._op(op), name=name,
                                       process_set=self._ps(process_set))

    def allgather(self, x, *, name, process_set=None):
        return self._hvd.allgather(x, name=name, process_set=self._ps(process_set))

    def broadcast(self, x, root=0, *, name, process_set=None):
        return self._hvd.broadcast(x, root_rank=root, name=name,
                                   process_set=self._ps(process_set))

    def alltoall(self, x, splits, *, name, process_set=None):
        out = self._hvd.alltoall(x, splits=tf.constant(list(splits), tf.int32), name=name,
                                 process_set=self._ps(process_set))
        return out[0] if isinstance(out, (tuple, list)) else out

    def broadcast_object(self, obj, root=0, *, name):
        return self._hvd.broadcast_object(obj, root_rank=root, name=name)

    def allgather_object(self, obj, *, name):
        return list(self._hvd.allgather_object(obj, name=name))

    def data_parallel_optimizer(self, optimizer):
        import horovod.tensorflow.keras as hvd_keras

        return hvd_keras.DistributedOptimizer(optimizer)

    def group(self, ranks):
        key = tuple(sorted(int(r) for r in ranks))
        if key not in self._sets:
            raise ValueError(
                f"Process set {list(key)} was not registered; pass it in "
                f"HorovodComm(process_sets=...). Registered: {[list(k) for k in self._sets]}")
        return Group(key, self._sets[key])


def default_comm(process_sets: Sequence[Sequence[int]] = (),
                 requested_by: Mapping[str, Any] | None = None) -> Communicator:
    """``HorovodComm`` when running under ``horovodrun`` (or Horovod is initialised), else local.

    A process counts as launched by ``horovodrun`` when the ``HOROVOD_RANK`` environment variable
    is set. Importing Horovod is avoided entirely otherwise, so single-process use does not need it.

    Args:
        process_sets: groups to register when this call starts Horovod (see
            :class:`HorovodComm`); ignored in a single process.
        requested_by: the settings ``process_sets`` were derived from, named when ranks want
            different sets (see :class:`HorovodComm`).
    """
    import sys

    if "HOROVOD_RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:
        return HorovodComm(process_sets, requested_by)
    hvd = sys.modules.get("horovod.tensorflow")
    if hvd is not None and hvd.is_initialized():
        return HorovodComm(process_sets, requested_by)
    return LocalComm()


class CountingComm(Communicator):
    """Wraps a communicator and records every collective: kind, name and bytes sent.

    In eager code every call is recorded; inside a ``tf.function`` the record is made once per
    trace, which is exactly one step's collectives. Used by tests and the scaling benchmark.

    Attributes:
        calls: list of ``(kind, name, nbytes)`` in call order.
        group_sizes: the number of ranks taking part in each call (its process set's size).
    """

    def __init__(self, inner: Communicator) -> None:
        self.inner = inner
        self.rank, self.size = inner.rank, inner.size
        self.calls: list[tuple[str, str, int]] = []
        self.group_sizes: list[int] = []

    def __repr__(self) -> str:
        return f"CountingComm({self.inner!r}, calls={len(self.calls)})"

    def _record(self, kind: str, name: str, process_set: Group | None,
                *tensors: tf.Tensor) -> None:
        nbytes = sum(int(t.shape.num_elements() or 0) * t.dtype.size for t in tensors)
        self.calls.append((kind, name, nbytes))
        self.group_sizes.append(self.inner.group_size(process_set))

    def records(self, start: int = 0) -> list[tuple[str, str, int, int]]:
        """``(kind, name, nbytes, group size)`` of the calls from index ``start``."""
        return [c + (g,) for c, g in zip(self.calls[start:], self.group_sizes[start:])]

    def count(self, kind: str | None = None) -> int:
        """Number of recorded collectives (of ``kind`` if given)."""
        return sum(1 for c in self.calls if kind is None or c[0] == kind)

    def bytes(self, kind: str | None = None) -> int:
        """Bytes handed to recorded collectives (of ``kind`` if given)."""
        return sum(c[2] for c in self.calls if kind is None or c[0] == kind)

    def reset(self) -> None:
        """Forget the recorded calls."""
        self.calls.clear()
        self.group_sizes.clear()

    def allreduce(self, x, op="sum", *, name, process_set=None):
        self._record("allreduce", name, process_set, x)
        return self.inner.allreduce(x, op, name=name, process_set=process_set)

    def grouped_allreduce(self, xs, op="sum", *, name, process_set=None):
        self._record("allreduce", name, process_set, *xs)
        return self.inner.grouped_allreduce(xs, op, name=name, process_set=process_set)

    def reducescatter(self, x, op="sum", *, name, process_set=None):
        self._record("reducescatter", name, process_set, x)
        return self.inner.reducescatter(x, op, name=name, process_set=process_set)

    def allgather(self, x, *, name, process_set=None):
        self._record("allgather", name, process_set, x)
        return self.inner.allgather(x, name=name, process_set=process_set)

    def broadcast(self, x, root=0, *, name, process_set=None):
        self._record("broadcast", name, process_set, x)
        return self.inner.broadcast(x, root, name=name, process_set=process_set)

    def alltoall(self, x, splits, *, name, process_set=None):
        self._record("alltoall", name, process_set, x)
        return self.inner.alltoall(x, splits, name=name, process_set=process_set)

    def broadcast_object(self, obj, root=0, *, name):
        return self.inner.broadcast_object(obj, root, name=name)

    def allgather_object(self, obj, *, name):
        return self.inner.allgather_object(obj, name=name)

    def barrier(self, name="dho2/barrier"):
        return self.inner.barrier(name)

    def group(self, ranks):
        return self.inner.group(ranks)

    def data_parallel_optimizer(self, optimizer):
        return self.inner.data_parallel_optimizer(optimizer)
