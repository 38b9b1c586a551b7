"""np ≥ 2: ``PrioritizedModel.fit`` with tf.keras SGD; equals one process on the union.

Run: ``horovodrun --gloo -np 2 -H localhost:2 python tests/parallel/prioritized_fit.py``.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from dho2_tf.distributed.comm import LocalComm
from dho2_tf.prioritized import PrioritizedModel, PrioritizedSampler
from tests.helpers import prioritized as helpers

SCCE = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class FitTest(helpers.HorovodTestCase):

    def test_full_selection_step_equals_single_process_gd_on_union(self):
        # k = 100%, keep: one PSGD step on P equal shards = one full-batch GD step on the union.
        sizes = [100] * self.comm.size
        x, y = helpers.classification_data(sum(sizes), d=10, classes=4)
        x_r, y_r = helpers.contiguous_shard([x, y], sizes, self.comm.rank)
        config = dict(k=1.0, r=0.01, estimator="keep")
        distributed = PrioritizedModel(helpers.mlp(d=10, classes=4), PrioritizedSampler.paper(**config))
        distributed.compile(optimizer=tf.keras.optimizers.SGD(0.1), loss=SCCE)
        distributed.fit(x_r, y_r, steps_per_epoch=1, verbose=0)
        single = PrioritizedModel(helpers.mlp(d=10, classes=4), PrioritizedSampler.paper(**config), comm=LocalComm())
        single.compile(optimizer=tf.keras.optimizers.SGD(0.1), loss=SCCE)
        single.fit(x, y, steps_per_epoch=1, verbose=0)
        for got, want in zip(distributed.model.variables, single.model.variables):
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)

    def test_fit_topk_and_importance_train_and_keep_replicas_identical(self):
        x, y = helpers.classification_data(400 * self.comm.size, seed=1, d=10, classes=4)
        x_r, y_r = helpers.contiguous_shard([x, y], [400] * self.comm.size, self.comm.rank)
        for kwargs in ({}, {"selection": "importance", "priority": "length"},
                       {"per_example": "last_layer", "aggregate_report": True}):
            tf.keras.utils.set_random_seed(self.comm.rank)  # different init: rank 0 wins
            pmodel = PrioritizedModel(helpers.mlp(seed=self.comm.rank, d=10, classes=4),
                                      PrioritizedSampler.paper(k=0.05, r=0.02, **kwargs))
            pmodel.compile(optimizer=tf.keras.optimizers.SGD(0.1, momentum=0.9), loss=SCCE,
                           metrics=["accuracy"])
            history = pmodel.fit(x_r, y_r, epochs=2, verbose=0, validation_data=(x, y))
            self.assertLess(history.history["val_loss"][-1], history.history["val_loss"][0])
            self.assert_replicas_equal(pmodel.model)

    def test_unequal_shards_take_the_same_number_of_steps(self):
        sizes = [240, 160] + [200] * (self.comm.size - 2)
        x, y = helpers.classification_data(sum(sizes), seed=3, d=10, classes=4)
        x_r, y_r = helpers.contiguous_shard([x, y], sizes, self.comm.rank)
        pmodel = PrioritizedModel(helpers.mlp(d=10, classes=4), PrioritizedSampler.paper(k=0.05, r=0.02))
        pmodel.compile(optimizer=tf.keras.optimizers.SGD(0.1), loss=SCCE)
        pmodel.fit(x_r, y_r, epochs=2, verbose=0)
        self.assertEqual(int(pmodel.sampler.step.numpy()), 1 + 2 * 20)  # ⌈n/K⌉ = ⌈400/20⌉
        self.assert_replicas_equal(pmodel.model)


if __name__ == "__main__":
    helpers.main("PRIORITIZED_FIT")
