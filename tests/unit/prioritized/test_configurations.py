"""The constructor's defaults are the recommended configuration; ``paper()`` is the released one."""

from __future__ import annotations

from dho2_tf.prioritized import PAPER, RECOMMENDED, PrioritizedModel, PrioritizedSampler
from dho2_tf.distributed.comm import LocalComm
from tests.helpers import prioritized as helpers


def test_default_constructor_equals_recommended():
    default = PrioritizedSampler().get_config()
    assert default == PrioritizedSampler.recommended().get_config()
    assert {key: default[key] for key in RECOMMENDED} == RECOMMENDED
    assert (default["k"], default["r"]) == (0.05, 0.01)
    model = PrioritizedModel(helpers.mlp(), comm=LocalComm())
    assert model.sampler.get_config() == default


def test_paper_is_the_released_configuration():
    """Zhou & Gao (IC2E 2021) and the released code: k = 5%, r = 1%, length priorities for the
    initial pass, projection on refresh, an r% round-robin refresh with exact per-example
    gradients, exp-linear staleness with θ_e = 0.8, per-shard top-k, no aggregated report; ḡ by
    the intended EMA; γ = 0.1 would be the importance floor."""
    released = {"k": 0.05, "r": 0.01, "priority": "projection", "init_priority": "length",
                "estimator": "exp-decay", "selection": "topk", "aggregate_report": False,
                "theta_e": 0.8, "gamma": 0.1, "max_weight": None, "gbar_update": "ema",
                "per_example": "exact", "chunk_size": 256, "seed": 0, "refresh": "pass",
                "pool": 3.0, "tau_threshold": 1.5, "tau_momentum": 0.9,
                "bookkeeping_interval": 1, "cost_ratio": 1.0}
    config = PrioritizedSampler.paper().get_config()
    assert config == released  # every field
    assert {key: config[key] for key in PAPER} == PAPER
    other = PrioritizedSampler.paper(k=0.02, r=0.03, seed=4).get_config()
    assert other == {**released, "k": 0.02, "r": 0.03, "seed": 4}
