"""Selection rules (docs/algorithm.md §9.5, §9.6, §9.9 properties 3, 6)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from dho2_tf.distributed.comm import LocalComm
from dho2_tf.prioritized import selection


def test_topk_equals_argpartition_without_ties():
    p = np.random.default_rng(0).permutation(1000).astype(np.float32)
    idx, weights = selection.select_topk(tf.constant(p), 37)
    assert set(idx.numpy()) == set(np.argpartition(-p, 37)[:37])
    np.testing.assert_allclose(weights.numpy(), np.full(37, 1 / 37), rtol=1e-6)


def test_importance_proposal_has_floor_and_sums_to_one():
    p = tf.constant([0.0, 4.0, 1.0, -3.0])
    q = selection.importance_proposal(p, gamma=0.2, use_sqrt=True).numpy()
    np.testing.assert_allclose(q, 0.8 * np.array([0, 2, 1, 0]) / 3 + 0.05, rtol=1e-6)
    assert q.min() >= 0.2 / 4
    uniform = selection.importance_proposal(tf.zeros([5]), 0.1, use_sqrt=False).numpy()
    np.testing.assert_allclose(uniform, np.full(5, 0.2), rtol=1e-6)


def test_importance_weights_are_bounded_by_inverse_gamma():
    p = tf.constant(np.random.default_rng(1).exponential(size=500).astype(np.float32))
    _, weights = selection.select_importance(p, 50, 0.25, False, tf.constant([1, 2]))
    assert float(tf.reduce_max(weights)) * 50 <= 1 / 0.25 + 1e-5
    _, clipped = selection.select_importance(p, 50, 0.25, False, tf.constant([1, 2]),
                                             max_weight=1.5)
    assert float(tf.reduce_max(clipped)) * 50 <= 1.5 + 1e-6


class GatherStub(LocalComm):
    """Plays one rank of P: ``allgather`` returns the pre-computed concatenation of all ranks."""

    def __init__(self, gathered: np.ndarray) -> None:
        super().__init__()
        self.gathered = gathered

    def allgather(self, x, *, name, process_set=None):
        return tf.constant(self.gathered)


@pytest.mark.parametrize("sizes", [[100, 100], [120, 80, 50]])
def test_global_topk_union_equals_topk_of_concatenation(sizes):
    rng = np.random.default_rng(len(sizes))
    p_all = rng.permutation(sum(sizes)).astype(np.float32)
    p_all[:40] += 1000  # make the first shard own most of the winners
    shards = np.split(p_all, np.cumsum(sizes)[:-1])
    k_total = sum(int(0.1 * n) for n in sizes)
    counts = selection.candidate_counts(sizes, k_total)
    gathered = np.concatenate([np.sort(s)[::-1][:c] for s, c in zip(shards, counts)])
    selected, total_weight = set(), 0.0
    for rank, shard in enumerate(shards):
        idx, w = selection.select_global_topk(tf.constant(shard), sizes, k_total, rank,
                                              GatherStub(gathered))
        offset = sum(sizes[:rank])
        selected |= {offset + int(i) for i, wi in zip(idx.numpy(), w.numpy()) if wi > 0}
        total_weight += float(tf.reduce_sum(w)) / len(sizes)
    assert selected == set(np.argsort(-p_all)[:k_total])
    assert total_weight == pytest.approx(1.0, rel=1e-6)  # mean over ranks of Σw = 1


def test_global_topk_on_one_process_equals_topk():
    p = tf.constant(np.random.default_rng(3).permutation(50).astype(np.float32))
    idx, w = selection.select_global_topk(p, [50], 5, 0, LocalComm())
    want, _ = selection.select_topk(p, 5)
    assert set(idx.numpy()) == set(want.numpy())
    np.testing.assert_allclose(w.numpy(), np.full(5, 0.2), rtol=1e-6)
