"""np ≥ 2: ``selection="global"`` selects the top-k of the union of the shards.

Run: ``horovodrun --gloo -np 2 -H localhost:2 python tests/parallel/prioritized_global.py``.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from dho2_tf.distributed.comm import LocalComm
from dho2_tf.prioritized import PrioritizedModel, PrioritizedSampler
from tests.parallel import prioritized_common as common

SCCE = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def skewed_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Classification data whose first 15% of rows carry large inputs (so large gradients)."""
    x, y = common.classification_data(n, seed=seed)
    x[: int(0.15 * n)] *= 4.0
    return x, y


class GlobalSelectionTest(common.HorovodTestCase):

    def selected_global_ids(self, sampler: PrioritizedSampler, sizes: list[int]) -> set[int]:
        idx, weights = sampler.select()
        offset = sum(sizes[: self.comm.rank])
        mine = [offset + int(i) for i, w in zip(idx.numpy(), weights.numpy()) if w > 0]
        total = self.comm.allreduce(tf.reduce_sum(weights), "mean", name="dho2/test/weight_sum")
        self.assertAlmostEqual(float(total), 1.0, places=5)
        gathered = self.comm.allgather_object(mine, name="dho2/test/selected")
        union = [i for ids in gathered for i in ids]
        self.assertEqual(len(union), len(set(union)))
        return set(union)

    def check_union_topk(self, sizes: list[int], priority: str) -> None:
        n = sum(sizes)
        x, y = skewed_data(n)
        model = common.mlp()
        kwargs = dict(k=0.05, r=0.01, priority=priority, init_priority=priority,
                      estimator="keep")
        sampler = PrioritizedSampler(selection="global", **kwargs)
        x_r, y_r = common.contiguous_shard([x, y], sizes, self.comm.rank)
        sampler.bind(model, SCCE, x_r, y_r, self.comm)
        sampler.initialize()
        reference = PrioritizedSampler(selection="topk", **kwargs)
        reference.bind(model, SCCE, x, y, LocalComm())  # one process, the union of the shards
        reference.initialize()
        self.assertEqual(sampler.num_selected_total, reference.num_selected)
        want = set(reference.select()[0].numpy())
        self.assertEqual(self.selected_global_ids(sampler, sizes), want)
        self.assertGreater(len(want & set(range(sizes[0]))), len(want) // 2)  # skewed

    def test_equal_shards_length_priority(self):
        self.check_union_topk([200] * self.comm.size, "length")

    def test_unequal_shards_loss_priority(self):
        sizes = [240, 160] + [200] * (self.comm.size - 2)
        self.check_union_topk(sizes, "loss")

    def test_global_selection_inside_fit_keeps_replicas_identical(self):
        x, y = skewed_data(200 * self.comm.size)
        x_r, y_r = common.contiguous_shard([x, y], [200] * self.comm.size, self.comm.rank)
        pmodel = PrioritizedModel(common.mlp(), PrioritizedSampler(k=0.05, selection="global"))
        pmodel.compile(optimizer=tf.keras.optimizers.SGD(0.05), loss=SCCE)
        pmodel.fit(x_r, y_r, epochs=2, verbose=0)
        self.assert_replicas_equal(pmodel.model)


if __name__ == "__main__":
    common.main("PRIORITIZED_GLOBAL")
