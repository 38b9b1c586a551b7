"""``replicated``: V, the Newton momentum and the base slots kept in full on every rank.

After the gradient allreduce (mean, the same single fused collective a data-parallel Keras
optimizer issues) every rank holds Ḡ and computes the identical full FOSI step locally: the
K-vector projections need no collective (:class:`dho2_tf.distributed.comm.LocalComm` completes
them), and the displacement is added to the weights in place. A refresh runs Lanczos with the
whole basis on every rank (HVP averaged by one allreduce per iteration, nothing else
communicated), so V comes out whole on every rank.

Per step: one allreduce of n numbers, then two (sgd/momentum/nesterov) or four (Adam) passes
over the full V [K, n]. State per rank: (slots + 1 + K)·n numbers, plus the transient basis of a
refresh (:func:`dho2_tf.modes.refresh_basis_rows` rows of n, in the basis dtype). Choose it when
that fits comfortably in a rank's memory (``mode="auto"`` decides with ``memory_budget``); it is
then faster than ``sharded``, whose three or four dependent collectives per step are
latency-bound, at the price of P times the state.
"""

from __future__ import annotations

from typing import Callable

import tensorflow as tf

from dho2_tf.modes.base import Mode
from dho2_tf.modes.context import StepPlan


class ReplicatedMode(Mode):
    """Replicated state, mean HVP reduction, one gradient allreduce per step."""

    name = "replicated"
    shards_state = False
    #: Every rank holds the whole Lanczos basis: one allreduce of the HVP per iteration.
    lanczos_basis = "replicated"
    imports_state_of = ("sharded",)

    def step_plan(self) -> StepPlan:
        """Ḡ = allreduce_mean(G); θ ← θ + δ with δ the full FOSI displacement (local maths)."""
        return StepPlan("allreduce", None, self.gradient_adjustment(), False,
                        self.projection(self.comm))

    def gradient_adjustment(self) -> Callable[[tf.Tensor, list[tf.Variable]], tf.Tensor] | None:
        """What the FOSI step adds to Ḡ (``None``: nothing; ``faithful``: the window offset)."""
        return None
