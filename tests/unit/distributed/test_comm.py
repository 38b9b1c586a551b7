"""The communicators on their own: LocalComm's collectives against numpy (a world of one rank),
CountingComm's record, Group and default_comm. HorovodComm's collectives at P = 2, 3, 4 are
checked against numpy under horovodrun (tests/parallel/modes_check.py ``comm``)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import tensorflow as tf

from dho2_tf.distributed.comm import CountingComm, Group, LocalComm, default_comm
from dho2_tf.distributed.sharding import ShardLayout

RNG = np.random.default_rng(0)
X = RNG.standard_normal((5, 3))


def as_tensor(x, dtype=tf.float64):
    return tf.constant(x, dtype=dtype)


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
@pytest.mark.parametrize("op", ["sum", "mean"])
def test_local_allreduce_is_the_sum_or_mean_over_one_rank(op, dtype):
    comm = LocalComm()
    out = comm.allreduce(as_tensor(X, dtype), op, name="t/allreduce")
    want = np.sum([X], axis=0) if op == "sum" else np.mean([X], axis=0)
    assert out.dtype == dtype and out.shape == X.shape
    np.testing.assert_allclose(out.numpy(), want.astype(dtype.as_numpy_dtype), rtol=0)


def test_local_grouped_allreduce_reduces_each_tensor_and_keeps_the_order():
    comm = LocalComm()
    xs = [X, X[:, 0], np.arange(4.0)]
    for op in ("sum", "mean"):
        out = comm.grouped_allreduce([as_tensor(x) for x in xs], op, name="t/grouped")
        assert len(out) == len(xs)
        for got, x in zip(out, xs):
            want = np.mean([x], axis=0) if op == "mean" else np.sum([x], axis=0)
            np.testing.assert_array_equal(got.numpy(), want)
    assert comm.grouped_allreduce([], name="t/empty") == []


@pytest.mark.parametrize("n", [5, 8])
def test_local_reducescatter_of_a_padded_vector_keeps_the_only_block(n):
    """The sharded path: pad to P·s, reduce-scatter, drop the padding. With P = 1 the one
    block is the whole (padded) sum."""
    comm = LocalComm()
    x = RNG.standard_normal(n)
    layout = ShardLayout(n, comm.size, comm.rank)
    for op in ("sum", "mean"):
        block = comm.reducescatter(layout.pad(as_tensor(x)), op, name="t/rs").numpy()
        total = np.sum([x], axis=0)                    # Σ over the ranks of the world
        assert block.shape == (layout.shard_size,)
        np.testing.assert_array_equal(block, total[layout.start:layout.stop])
        np.testing.assert_array_equal(layout.unpad(tf.constant(block)).numpy(), total)


def test_local_allgather_concatenates_along_dimension_zero():
    comm = LocalComm()
    out = comm.allgather(as_tensor(X), name="t/ag")
    np.testing.assert_array_equal(out.numpy(), np.concatenate([X], axis=0))


def test_local_broadcast_from_root_zero_and_rejects_another_root():
    comm = LocalComm()
    np.testing.assert_array_equal(comm.broadcast(as_tensor(X), 0, name="t/bc").numpy(), X)
    with pytest.raises(ValueError, match="`root` must be 0 in a single process. Received: root=1"):
        comm.broadcast(as_tensor(X), 1, name="t/bc")


def test_local_alltoall_sends_every_row_to_the_only_member():
    comm = LocalComm()
    out = comm.alltoall(as_tensor(X), [X.shape[0]], name="t/a2a")
    np.testing.assert_array_equal(out.numpy(), X)


def test_local_collectives_trace_inside_tf_function():
    """The optimizer's steps call the communicator inside tf.function."""
    comm = LocalComm()

    @tf.function
    def step(x):
        a, b = comm.grouped_allreduce([x, 2.0 * x], "sum", name="t/g")
        s = comm.reducescatter(comm.allreduce(x, "mean", name="t/m"), name="t/rs")
        return a + b + comm.allgather(s, name="t/ag") + comm.broadcast(x, name="t/bc")

    np.testing.assert_allclose(step(as_tensor(X)).numpy(), 5.0 * X)


@pytest.mark.parametrize("call", [
    lambda c, x: c.allreduce(x, "max", name="t"),
    lambda c, x: c.grouped_allreduce([x], "prod", name="t"),
    lambda c, x: c.reducescatter(x, "avg", name="t"),
])
def test_unknown_reduction_is_rejected(call):
    with pytest.raises(ValueError, match=r"`op` must be one of \('sum', 'mean'\)"):
        call(LocalComm(), as_tensor(X))


def test_local_objects_groups_and_ranks():
    comm = LocalComm()
    obj = {"a": [1, 2], "b": "x"}
    assert comm.broadcast_object(obj, name="t/o") is obj
    assert comm.allgather_object(obj, name="t/o") == [obj]
    assert comm.barrier() is None
    assert (comm.rank, comm.size, comm.is_root) == (0, 1, True)
    group = comm.group([0])
    assert group == Group((0,)) and group.size() == 1 and group.includes(0)
    assert (comm.group_size(None), comm.group_rank(None)) == (1, 0)
    assert (comm.group_size(group), comm.group_rank(group)) == (1, 0)
    with pytest.raises(ValueError, match=r"only form the group \[0\]. Received: \(0, 1\)"):
        comm.group([1, 0])
    optimizer = tf.keras.optimizers.SGD()
    assert comm.data_parallel_optimizer(optimizer) is optimizer


def test_group_membership_and_rank_inside_the_group():
    group = Group((1, 3, 4))
    assert group.size() == 3
    assert [group.includes(r) for r in range(5)] == [False, True, False, True, True]
    assert [group.rank_of(r) for r in (1, 3, 4)] == [0, 1, 2]
    with pytest.raises(ValueError):
        group.rank_of(0)
    assert Group((1, 3, 4), handle="a") == Group((1, 3, 4), handle="b")  # handle not compared


def test_counting_comm_records_kind_name_and_bytes_and_forwards():
    counting = CountingComm(LocalComm())
    x32 = tf.constant(X, tf.float32)                               # 15 floats: 60 bytes
    x64 = tf.constant(X[:, 0], tf.float64)                         # 5 doubles: 40 bytes
    np.testing.assert_array_equal(counting.allreduce(x32, "mean", name="a").numpy(),
                                  X.astype(np.float32))
    counting.grouped_allreduce([x32, x64], name="g")
    counting.reducescatter(x64, name="rs")
    counting.allgather(x32, name="ag")
    counting.broadcast(x64, name="bc")
    counting.alltoall(x32, [5], name="a2a")
    assert counting.calls == [("allreduce", "a", 60), ("allreduce", "g", 100),
                              ("reducescatter", "rs", 40), ("allgather", "ag", 60),
                              ("broadcast", "bc", 40), ("alltoall", "a2a", 60)]
    assert (counting.count(), counting.count("allreduce"), counting.bytes("allreduce"),
            counting.bytes()) == (6, 2, 160, 360)
    assert counting.allgather_object(7, name="o") == [7] and counting.count() == 6  # not counted
    counting.reset()
    assert counting.calls == [] and counting.count() == 0


def test_counting_comm_records_once_per_trace():
    counting = CountingComm(LocalComm())
    step = tf.function(lambda x: counting.allreduce(x, name="dho2/gradient"))
    for _ in range(3):
        step(tf.ones([4]))
    assert counting.calls == [("allreduce", "dho2/gradient", 16)]


def test_default_comm_is_local_outside_horovodrun(monkeypatch):
    monkeypatch.delenv("HOROVOD_RANK", raising=False)
    monkeypatch.delenv("OMPI_COMM_WORLD_RANK", raising=False)
    monkeypatch.setitem(sys.modules, "horovod.tensorflow", None)   # not started in this process
    assert isinstance(default_comm([(0,)]), LocalComm)
