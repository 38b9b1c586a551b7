"""ShardLayout: shard bounds, padding and the per-rank view of a flat vector, against numpy,
including n not divisible by P and shards made only of padding."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from dho2_tf.distributed.sharding import ShardLayout
from tests.helpers.ranks import run_on_ranks

CASES = [(10, 1), (10, 2), (10, 3), (10, 4), (11, 4), (7, 3), (5, 4), (3, 5), (100, 7)]


@pytest.mark.parametrize("n,p", CASES)
def test_bounds_tile_the_padded_vector(n, p):
    s = int(np.ceil(n / p))
    starts = []
    for r in range(p):
        layout = ShardLayout(n, p, r)
        assert (layout.shard_size, layout.padded_size) == (s, p * s)
        assert (layout.start, layout.stop) == (r * s, (r + 1) * s)
        assert all(layout.bounds(j) == (j * s, (j + 1) * s) for j in range(p))
        starts.append(layout.start)
    # Consecutive, disjoint, covering [0, P·s) ⊇ [0, n) with fewer than P padding entries.
    assert starts == list(range(0, p * s, s))
    assert 0 <= p * s - n < p


@pytest.mark.parametrize("n,p", CASES)
def test_pad_local_unpad_against_numpy(n, p):
    x = np.random.default_rng(n * 31 + p).standard_normal((n, 2))
    padded_np = np.concatenate([x, np.zeros((-(-n // p) * p - n, 2))])
    pieces = []
    for r in range(p):
        layout = ShardLayout(n, p, r)
        padded = layout.pad(tf.constant(x))
        np.testing.assert_array_equal(padded.numpy(), padded_np)
        np.testing.assert_array_equal(layout.unpad(padded).numpy(), x)
        mine = layout.local(tf.constant(x))                     # from the unpadded vector ...
        np.testing.assert_array_equal(mine.numpy(), padded_np[layout.start:layout.stop])
        np.testing.assert_array_equal(layout.local(padded).numpy(), mine.numpy())  # ... or padded
        pieces.append(mine.numpy())
    np.testing.assert_array_equal(np.concatenate(pieces)[:n], x)


def test_all_padding_shard_is_zero_and_starts_past_n():
    layout = ShardLayout(5, 4, 3)                              # s = 2: shard 3 is [6, 8)
    assert layout.start >= layout.n
    x = tf.constant(np.arange(1.0, 6.0))
    np.testing.assert_array_equal(layout.local(x).numpy(), [0.0, 0.0])
    y = tf.constant([1.0, 2.0, 3.0, 4.0])
    assert ShardLayout(4, 2, 0).pad(y) is y                   # nothing to pad: no copy


def test_padding_never_changes_a_dot_product_or_norm():
    n, p = 11, 4
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal(n), rng.standard_normal(n)
    parts = [ShardLayout(n, p, r) for r in range(p)]
    dot = sum(float(tf.tensordot(lay.local(tf.constant(a)), lay.local(tf.constant(b)), 1))
              for lay in parts)
    assert dot == pytest.approx(float(a @ b), rel=1e-12)


@pytest.mark.parametrize("n,p", [(11, 2), (11, 3), (11, 4), (5, 4)])
def test_reducescatter_of_padded_vectors_is_the_local_part_of_the_sum(n, p):
    """The sharded gradient path: each rank pads its Ḡ_r, reduce-scatters, and holds
    layout.local(Σ_r Ḡ_r); all-gathering the blocks and unpadding gives back Σ_r Ḡ_r."""
    xs = np.random.default_rng(p).standard_normal((p, n))

    def rank(comm):
        layout = ShardLayout(n, comm.size, comm.rank)
        block = comm.reducescatter(layout.pad(tf.constant(xs[comm.rank])), name="g")
        whole = layout.unpad(comm.allgather(block, name="d"))
        return block.numpy(), whole.numpy(), layout

    total = xs.sum(0)
    for block, whole, layout in run_on_ranks(p, rank):
        np.testing.assert_allclose(block, layout.local(tf.constant(total)).numpy(), rtol=1e-12)
        np.testing.assert_allclose(whole, total, rtol=1e-12)


@pytest.mark.parametrize("kwargs,message", [
    (dict(n=0, num_shards=2, index=0), "`n` must be a positive integer. Received: n=0"),
    (dict(n=4, num_shards=0, index=0), "`num_shards` must be positive. Received: 0"),
    (dict(n=4, num_shards=2, index=2), r"`index` must be in \[0, 2\). Received: index=2"),
    (dict(n=4, num_shards=2, index=-1), r"`index` must be in \[0, 2\). Received: index=-1"),
])
def test_invalid_layouts_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ShardLayout(**kwargs)
