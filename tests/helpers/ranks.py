"""P simulated ranks in one process, for unit tests of maths that calls collectives.

:func:`run_on_ranks` runs ``fn(comm)`` on P threads; each thread's :class:`ThreadComm` meets the
others at every collective and combines their values with numpy (sum, mean, concatenation,
equal dim-0 blocks). Real Horovod semantics at P = 2, 3, 4 are checked under ``horovodrun`` by
``tests/parallel/modes_check.py comm``; this stand-in lets a unit test split a computation over
P "ranks" and compare it with the unsplit one.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from dho2_tf.distributed.comm import Communicator


class _Meeting:
    """Where the P threads exchange one value each per collective."""

    def __init__(self, size: int) -> None:
        self.barrier = threading.Barrier(size, timeout=120)
        self.slots: list[Any] = [None] * size

    def exchange(self, rank: int, key: str, value: Any) -> list[Any]:
        self.slots[rank] = (key, value)
        self.barrier.wait()
        seen = list(self.slots)
        self.barrier.wait()                 # nobody overwrites a slot before all have read
        keys = {k for k, _ in seen}
        if len(keys) != 1:
            raise AssertionError(f"ranks issued different collectives at once: {sorted(keys)}")
        return [v for _, v in seen]


class ThreadComm(Communicator):
    """One simulated rank (all ranks only: ``process_set`` must be ``None``)."""

    def __init__(self, rank: int, size: int, meeting: _Meeting) -> None:
        self.rank, self.size, self._meeting = rank, size, meeting
        self.calls: list[tuple[str, str]] = []

    def _gather(self, kind: str, name: str, value: Any, process_set: Any = None) -> list[Any]:
        if process_set is not None:
            raise NotImplementedError("ThreadComm has no process sets")
        self.calls.append((kind, name))
        return self._meeting.exchange(self.rank, f"{kind}:{name}", value)

    @staticmethod
    def _reduce(values: list[np.ndarray], op: str) -> np.ndarray:
        total = np.sum(values, axis=0)
        return total / len(values) if op == "mean" else total

    def allreduce(self, x, op="sum", *, name, process_set=None):
        values = self._gather("allreduce", name, np.asarray(x), process_set)
        return tf.constant(self._reduce(values, op), dtype=x.dtype)

    def grouped_allreduce(self, xs, op="sum", *, name, process_set=None):
        values = self._gather("allreduce", name, [np.asarray(x) for x in xs], process_set)
        return [tf.constant(self._reduce([v[i] for v in values], op), dtype=x.dtype)
                for i, x in enumerate(xs)]

    def reducescatter(self, x, op="sum", *, name, process_set=None):
        total = self._reduce(self._gather("reducescatter", name, np.asarray(x), process_set), op)
        assert total.shape[0] % self.size == 0, "reducescatter needs P equal blocks (pad first)"
        block = total.shape[0] // self.size
        return tf.constant(total[self.rank * block:(self.rank + 1) * block], dtype=x.dtype)

    def allgather(self, x, *, name, process_set=None):
        values = self._gather("allgather", name, np.asarray(x), process_set)
        return tf.constant(np.concatenate(values, axis=0), dtype=x.dtype)

    def broadcast(self, x, root=0, *, name, process_set=None):
        values = self._gather("broadcast", name, np.asarray(x), process_set)
        return tf.constant(values[root], dtype=x.dtype)


def run_on_ranks(size: int, fn: Callable[[ThreadComm], Any]) -> list[Any]:
    """``[fn(comm_0), ..., fn(comm_{P−1})]``, each on its own thread; re-raises the first error
    (and breaks the barrier so no thread waits for a rank that failed)."""
    meeting = _Meeting(size)
    results: list[Any] = [None] * size
    errors: list[BaseException] = []

    def body(rank: int) -> None:
        try:
            results[rank] = fn(ThreadComm(rank, size, meeting))
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            errors.append(err)
            meeting.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
        raise (real or errors)[0]
    return results
