"""Prioritized SGD (Zhou & Gao, IC2E 2021): train on the examples with the highest priority.

Public API:

* :class:`PrioritizedSampler` — the per-rank priority table (priorities, staleness estimators,
  round-robin refresh, top-k / importance / global selection).
* :class:`PrioritizedModel` — Keras wrapper: ``compile`` with any optimizer, ``fit(x, y)``.
* :func:`per_example_gradients`, :func:`per_example_loss_fn` — vectorised per-example gradients.
* :mod:`.switch` — the variance-reduction factor τ that switches importance sampling on.

See ``docs/prioritized.md`` for a usage example and the benchmark.
"""

from __future__ import annotations

from dho2_tf.prioritized.model import PrioritizedModel
from dho2_tf.prioritized.per_example import (
    ExactScorer,
    LastLayerScorer,
    LossScorer,
    Scores,
    per_example_gradients,
    per_example_loss_fn,
)
from dho2_tf.prioritized.sampler import PAPER, RECOMMENDED, PrioritizedSampler
from dho2_tf.prioritized.staleness import PriorityTable, estimate_priorities, refresh_priorities

__all__ = [
    "ExactScorer",
    "LastLayerScorer",
    "LossScorer",
    "PAPER",
    "PrioritizedModel",
    "PrioritizedSampler",
    "PriorityTable",
    "RECOMMENDED",
    "Scores",
    "estimate_priorities",
    "per_example_gradients",
    "per_example_loss_fn",
    "refresh_priorities",
]
