"""np ≥ 2: ``selection="global"`` selects the top-k of the union of the shards.

Run: ``horovodrun --gloo -np 2 -H localhost:2 python tests/parallel/prioritized_global.py``.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from dho2_tf.distributed.comm import LocalComm
from dho2_tf.prioritized import PrioritizedModel, PrioritizedSampler
from tests.helpers import prioritized as helpers

SCCE = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def skewed_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Classification data whose first 15% of rows carry large inputs (so large gradients)."""
    x, y = helpers.classification_data(n, seed=seed, d=10, classes=4)
    x[: int(0.15 * n)] *= 4.0
    return x, y


def linear_model(d: int = 10, classes: int = 4) -> tf.keras.Model:
    """Softmax regression (‖g_i‖ grows with ‖x_i‖), identically initialised on every rank."""
    tf.keras.utils.set_random_seed(0)
    return tf.keras.Sequential([tf.keras.Input((d,)), tf.keras.layers.Dense(classes)])


class GlobalSelectionTest(helpers.HorovodTestCase):

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
        model = helpers.mlp(d=10, classes=4)
        kwargs = dict(k=0.05, r=0.01, priority=priority, init_priority=priority,
                      estimator="keep")
        sampler = PrioritizedSampler.paper(selection="global", **kwargs)
        x_r, y_r = helpers.contiguous_shard([x, y], sizes, self.comm.rank)
        sampler.bind(model, SCCE, x_r, y_r, self.comm)
        sampler.initialize()
        reference = PrioritizedSampler.paper(selection="topk", **kwargs)
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
        x_r, y_r = helpers.contiguous_shard([x, y], [200] * self.comm.size, self.comm.rank)
        pmodel = PrioritizedModel(helpers.mlp(d=10, classes=4), PrioritizedSampler.paper(k=0.05, selection="global"))
        pmodel.compile(optimizer=tf.keras.optimizers.SGD(0.05), loss=SCCE)
        pmodel.fit(x_r, y_r, epochs=2, verbose=0)
        self.assert_replicas_equal(pmodel.model)

    def test_free_refresh_global_selection_equals_one_process_on_the_union(self):
        """P ranks with ``global`` + ``refresh="free"`` = one process with top-k on the union."""
        sizes = [200] * self.comm.size
        x, y = skewed_data(sum(sizes))
        kwargs = dict(k=0.05, r=0.01, priority="length", init_priority="length",
                      estimator="keep", refresh="free", per_example="last_layer")
        x_r, y_r = helpers.contiguous_shard([x, y], sizes, self.comm.rank)
        pmodel = PrioritizedModel(helpers.mlp(d=10, classes=4), PrioritizedSampler.paper(selection="global", **kwargs),
                                  comm=self.comm)
        pmodel.compile(optimizer=tf.keras.optimizers.SGD(0.05), loss=SCCE)
        pmodel.fit(x_r, y_r, epochs=1, steps_per_epoch=4, verbose=0)
        reference = PrioritizedModel(helpers.mlp(d=10, classes=4), PrioritizedSampler.paper(selection="topk", **kwargs),
                                     comm=LocalComm())
        reference.compile(optimizer=tf.keras.optimizers.SGD(0.05), loss=SCCE)
        reference.fit(x, y, epochs=1, steps_per_epoch=4, verbose=0)
        stamps = np.concatenate(self.comm.allgather_object(
            pmodel.sampler.prio_t.numpy(), name="dho2/test/free_stamps"))
        values = np.concatenate(self.comm.allgather_object(
            pmodel.sampler.prio.numpy(), name="dho2/test/free_values"))
        np.testing.assert_array_equal(stamps, reference.sampler.prio_t.numpy())
        num_selected = pmodel.sampler.num_selected_total
        self.assertEqual(int(np.sum(stamps == 4)), num_selected)  # the last step's K winners
        np.testing.assert_allclose(values, reference.sampler.prio.numpy(), rtol=1e-4, atol=1e-7)
        for mine, ref in zip(pmodel.model.get_weights(), reference.model.get_weights()):
            np.testing.assert_allclose(mine, ref, rtol=1e-4, atol=1e-6)
        self.assert_replicas_equal(pmodel.model)

    def test_adaptive_switch_decision_is_the_same_on_every_rank(self):
        """One τ from the sum over ranks: rank 0's skewed shard switches every rank on."""
        sizes = [200] * self.comm.size
        x, y = helpers.classification_data(sum(sizes), d=10, classes=4)
        x[:20] *= 30.0  # 10% of rank 0's shard has ~30x larger gradients
        x, y = helpers.contiguous_shard([x, y], sizes, self.comm.rank)
        sampler = PrioritizedSampler.recommended(k=0.1, r=0.05, seed=self.comm.rank)
        sampler.bind(linear_model(), SCCE, x, y, self.comm)
        sampler.initialize()
        p_hat = sampler.estimated_priorities().numpy()
        s = np.sqrt(np.maximum(p_hat, 0.0))
        gamma = sampler.gamma   # the recommended uniform floor γ
        q = (1.0 - gamma) * s / s.sum() + gamma / len(s)
        terms = [np.sum(s ** 2) / len(s), np.sum(s ** 2 / q) / len(s) ** 2]
        gathered = np.array(self.comm.allgather_object(terms, name="dho2/test/tau_terms"))
        want = gathered[:, 0].sum() / gathered[:, 1].sum()
        self.assertAlmostEqual(float(sampler.tau.numpy()), want, delta=1e-4 * want)
        self.assertGreater(want, sampler.tau_threshold)
        fitted = PrioritizedModel(linear_model(), PrioritizedSampler.recommended(
            k=0.1, r=0.05, seed=self.comm.rank, cost_ratio=1.0), comm=self.comm)
        fitted.compile(optimizer=tf.keras.optimizers.SGD(0.05), loss=SCCE)
        fitted.fit(x, y, epochs=2, verbose=0)
        state = fitted.sampler.switch_statistics()
        for other in self.comm.allgather_object(state, name="dho2/test/switch_state"):
            self.assertEqual(other, state)
        self.assertEqual(state["importance_on"], 1.0)
        self.assert_replicas_equal(fitted.model)

    def test_measured_cost_ratio_is_reduced_over_ranks(self):
        """ĉ = Σ_ranks T̄_full / Σ_ranks T̄_light from each rank's own step times: the same on
        every rank though the ranks' times differ, and the decision τ̄ > max(τ_th, ĉ) too."""
        sizes = [200] * self.comm.size
        x, y = helpers.classification_data(sum(sizes), d=10, classes=4)
        x[:20] *= 30.0
        x, y = helpers.contiguous_shard([x, y], sizes, self.comm.rank)
        sampler = PrioritizedSampler(k=0.1, r=0.05, refresh="pass", per_example="exact",
                                     seed=self.comm.rank)
        sampler.bind(linear_model(), SCCE, x, y, self.comm)
        sampler.initialize()
        light = 0.001 * (1 + self.comm.rank)  # rank-specific mean times
        full = 0.001 * (2 + 3 * self.comm.rank)
        sampler.step_seconds.assign([4 * light, 2 * full])
        sampler.step_counts.assign([4.0, 2.0])
        sampler.select()  # refresh="pass": the adaptive rule decides on each selection
        ranks = range(self.comm.size)
        want = sum(2 + 3 * r for r in ranks) / sum(1 + r for r in ranks)
        self.assertAlmostEqual(float(sampler.cost.numpy()), want, places=5)
        state = sampler.switch_statistics()
        for other in self.comm.allgather_object(state, name="dho2/test/cost_state"):
            self.assertEqual(other, state)
        self.assertEqual(state["importance_on"] == 1.0,
                         state["tau_ema"] > max(sampler.tau_threshold, want))

    def test_light_steps_and_measured_decision_are_the_same_on_every_rank(self):
        """The default sampler in fit: the same schedule of light and full steps and the same
        (τ, τ̄, ĉ, decision) on every rank, from the ranks' own measured step times."""
        sizes = [200] * self.comm.size
        x, y = helpers.classification_data(sum(sizes), d=10, classes=4)
        x[:20] *= 30.0
        x, y = helpers.contiguous_shard([x, y], sizes, self.comm.rank)
        fitted = PrioritizedModel(linear_model(), PrioritizedSampler(
            k=0.1, bookkeeping_interval=4, seed=self.comm.rank), comm=self.comm)
        fitted.compile(optimizer=tf.keras.optimizers.SGD(0.05), loss=SCCE)
        fitted.fit(x, y, epochs=3, verbose=0)
        sampler = fitted.sampler
        state = {**sampler.switch_statistics(),
                 "counts": sampler.step_counts.numpy().tolist(),
                 "bookkeeping": int(sampler.bookkeeping_steps.numpy())}
        for other in self.comm.allgather_object(state, name="dho2/test/fit_cost_state"):
            self.assertEqual(other, state)
        self.assertEqual(sum(state["counts"]), 30)  # ⌈400/40⌉ = 10 steps per epoch
        self.assertEqual(state["counts"][1], state["bookkeeping"])
        self.assertGreaterEqual(state["bookkeeping"], 30 // 4)  # at least every 4th step
        self.assertGreater(state["counts"][0], 0)  # light steps were taken and timed
        self.assertNotEqual(state["cost_ratio"], 1.0)  # ĉ was measured
        self.assertEqual(state["importance_on"] == 1.0,
                         state["tau_ema"] > max(sampler.tau_threshold, state["cost_ratio"]))
        self.assert_replicas_equal(fitted.model)


if __name__ == "__main__":
    helpers.main("PRIORITIZED_GLOBAL")
