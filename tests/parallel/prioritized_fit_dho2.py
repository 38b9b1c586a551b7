"""np ≥ 2: ``PrioritizedModel.fit`` with ``dho2_tf.DHO2`` and its ``CurvatureRefresh`` callback.

Run: ``horovodrun --gloo -np 2 -H localhost:2 python tests/parallel/prioritized_fit_dho2.py``.
"""

from __future__ import annotations

import tensorflow as tf

from dho2_tf import DHO2, CurvatureRefresh
from dho2_tf.prioritized import PrioritizedModel, PrioritizedSampler
from tests.helpers import prioritized as helpers

SCCE = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class DHO2FitTest(helpers.HorovodTestCase):

    def test_fit_with_dho2_runs_to_completion_with_identical_replicas(self):
        x, y = helpers.classification_data(400 * self.comm.size, seed=2, d=10, classes=4)
        x_r, y_r = helpers.contiguous_shard([x, y], [400] * self.comm.size, self.comm.rank)
        pmodel = PrioritizedModel(helpers.mlp(seed=self.comm.rank, d=10, classes=4),  # rank 0's weights win
                                  PrioritizedSampler.paper(k=0.05, r=0.01))
        pmodel.compile(optimizer=DHO2(base="sgd", learning_rate=0.1, k=2, refresh_every=5),
                       loss=SCCE, metrics=["accuracy"])
        self.assertFalse(pmodel._should_average())  # DHO2 averages the gradients itself
        refresh = CurvatureRefresh(batch=(x_r[:64], y_r[:64]))
        history = pmodel.fit(x_r, y_r, epochs=2, verbose=0, validation_data=(x, y),
                             callbacks=[refresh])
        self.assertEqual(len(history.history["val_loss"]), 2)
        self.assertLess(history.history["val_loss"][-1], history.history["val_loss"][0])
        self.assertGreaterEqual(len(refresh.refreshes), 8)  # 40 steps, every 5 after warm-up
        self.assert_replicas_equal(pmodel.model)


if __name__ == "__main__":
    helpers.main("PRIORITIZED_DHO2_FIT")
