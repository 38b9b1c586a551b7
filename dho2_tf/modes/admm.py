"""``admm``: consensus ADMM whose local solver is τ DHO2 steps (Boyd et al., "Distributed
Optimization and Statistical Learning via the Alternating Direction Method of Multipliers", 2011,
§7.1).

Each rank minimises its own f_i(x_i) + π_iᵀ(x_i − z) + ρ/2‖x_i − z‖² with τ local hybrid steps
(no communication), then one allreduce forms z and the duals are updated
(:func:`dho2_tf.distributed.outer_rules.consensus_round`). Curvature is estimated at z with the
HVP averaged over all ranks; V is kept in full on every rank so local steps need no collective,
and η uses the Hessian of the augmented local objective, H + ρI.

Per step: no collective, four passes over the full V [K, n]; every τ steps one allreduce of
n + 1 numbers (plus the batch-norm statistics). State per rank: (slots + 3 + K)·n numbers.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import tensorflow as tf

from dho2_tf.distributed.outer_rules import consensus_round
from dho2_tf.flat import flatten
from dho2_tf.modes.base import Mode, assign_flat, state_property
from dho2_tf.modes.context import (AverageStatistics, HostAction, RefreshIfDue, StateVariable,
                                   StepPlan)
from dho2_tf.numerics import scalar


class AdmmMode(Mode):
    """Local optimizer state and full V per rank; one allreduce every τ steps."""

    name = "admm"
    shards_state = False
    state_is_rank_local = True

    def __init__(self, hp: Any) -> None:
        super().__init__(hp)
        self._started_seen = False   # Python copy of `started` once it is 1

    def state_variables(self, n: int, dtype: tf.DType) -> tuple[StateVariable, ...]:
        """z and π (n each), the last round's residuals, the rounds, whether z was set."""
        return (StateVariable("admm_z", (n,), dtype), StateVariable("admm_dual", (n,), dtype),
                StateVariable("admm_residuals", (2,), dtype),
                StateVariable("admm_rounds", (), tf.int64),
                StateVariable("admm_started", (), tf.int64))

    z = state_property("admm_z", "The consensus z.")
    dual = state_property("admm_dual", "This rank's dual π.")
    residuals = state_property("admm_residuals", "The last round's primal and dual residuals.")
    rounds = state_property("admm_rounds", "The consensus rounds so far.")
    started = state_property("admm_started", "1 once z was set from the weights at the very "
                             "first step.")

    def step_plan(self) -> StepPlan:
        """G = ∇f_i(x) + π + ρ(x − z); x ← x + c·u − α·d, all local (no collective)."""
        return StepPlan("none", None, self.gradient_adjustment(), False,
                        self.projection(self.comm))

    def gradient_adjustment(self) -> Callable[[tf.Tensor, list[tf.Variable]], tf.Tensor]:
        """G ↦ G + π + ρ(x − z), x the flat weights."""
        rho, dual, z = self.hp.rho, self.dual, self.z

        def adjust(g: tf.Tensor, weights: list[tf.Variable]) -> tf.Tensor:
            x = flatten(weights)
            return g + dual + scalar(rho, x.dtype) * (x - z)

        return adjust

    def sync_host_state(self) -> None:
        self._started_seen = False

    def on_step_begin(self, iterations: int) -> tuple[HostAction, ...]:
        """z ← x at the very first step, then refresh at z when due."""
        if not self._started_seen:
            if int(self.started.numpy()) == 0:
                self.z.assign(flatten(self.context.weights))
                self.started.assign(1)
            self._started_seen = True
        return (RefreshIfDue(),)

    def on_step_end(self, iterations: int) -> tuple[HostAction, ...]:
        """Every τ local steps: consensus round, then the averaged batch-norm statistics."""
        ctx, hp = self.context, self.hp
        if iterations % hp.tau != 0:
            return ()
        result = consensus_round(flatten(ctx.weights), self.dual.value(), self.z.value(),
                                 hp.rho, ctx.comm)
        self.z.assign(result.z)
        self.dual.assign(result.dual)
        if hp.x_restart == "z":
            assign_flat(ctx.weights, result.z, ctx.spec)
        self.residuals.assign(tf.stack([result.primal_residual, result.dual_residual]))
        self.rounds.assign_add(1)
        return (AverageStatistics("dho2/admm/bn_stats"),)

    def check_hooks_ran(self, t: tf.Tensor) -> Any:
        """Update t needs ⌊t/τ⌋ consensus rounds behind it (run by ``on_step_end``)."""
        tau = self.hp.tau
        return tf.debugging.assert_less_equal(t // tau, tf.cast(self.rounds, t.dtype), message=(
            f"DHO2 mode='admm': more than tau={tau} local steps ran without a consensus round, "
            "so the ranks drift apart: optimizer.on_step_end() was not called after "
            "apply_gradients. Drive the loop with dho2_tf.training_loop(optimizer, model, loss, "
            "batch), or call on_step_end() after every update."))

    @contextlib.contextmanager
    def consensus_weights(self) -> Iterator[None]:
        """Temporarily put z into the model (for evaluation and curvature estimation)."""
        ctx = self.context
        saved = flatten(ctx.weights)
        assign_flat(ctx.weights, self.z.value(), ctx.spec)
        try:
            yield
        finally:
            assign_flat(ctx.weights, saved, ctx.spec)

    def evaluation_weights(self) -> Any:
        """Evaluate the consensus z (see :meth:`consensus_weights`)."""
        return self.consensus_weights()

    def curvature_weights(self) -> Any:
        """Curvature is estimated (and checked) at the consensus z."""
        return self.consensus_weights()

    @property
    def eigenvalue_shift(self) -> float:
        """η uses the Hessian of the augmented local objective, H + ρI."""
        return self.hp.rho

    def on_train_end(self) -> tuple[HostAction, ...]:
        """Leave the consensus z in the model: that is the trained model."""
        ctx = self.context
        assign_flat(ctx.weights, self.z.value(), ctx.spec)
        return ()

    def metrics(self) -> dict[str, float]:
        primal, dual = self.residuals.numpy()
        return {"admm_primal_residual": float(primal), "admm_dual_residual": float(dual),
                "admm_rounds": float(self.rounds.numpy())}
