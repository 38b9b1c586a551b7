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
from typing import Any, Iterator

import tensorflow as tf

from dho2_tf.distributed.outer_rules import consensus_round
from dho2_tf.flat import flatten
from dho2_tf.modes.base import Mode, assign_flat
from dho2_tf.numerics import scalar


class AdmmMode(Mode):
    """Local optimizer state and full V per rank; one allreduce every τ steps."""

    name = "admm"
    shards_state = False
    state_is_rank_local = True

    def build(self, var_list: list[tf.Variable]) -> None:
        n, dtype = self.opt.spec.n, var_list[0].dtype
        self.z = self.opt.add_variable([n], dtype, name="admm_z")
        self.dual = self.opt.add_variable([n], dtype, name="admm_dual")
        self.residuals = self.opt.add_variable([2], dtype, name="admm_residuals")
        self.rounds = self.opt.add_variable([], tf.int64, name="admm_rounds")
        self.started = self.opt.add_variable([], tf.int64, name="admm_started")

    def __init__(self, opt) -> None:
        super().__init__(opt)
        self._started_seen = False   # Python copy of `started` once it is 1

    def step(self, grads: list[tf.Tensor], variables: list[tf.Variable]) -> None:
        """G = ∇f_i(x) + π + ρ(x − z); x ← x + c·u − α·d, all local (no collective)."""
        opt = self.opt
        x = flatten(variables)
        g = flatten(grads, opt.spec, x.dtype) + self.dual + scalar(opt.rho, x.dtype) * (x - self.z)
        opt.apply_fosi_step(g, variables)

    def sync_host_state(self) -> None:
        self._started_seen = False

    def on_step_begin(self, iterations: int) -> None:
        """z ← x at the very first step, then refresh at z when due."""
        if not self._started_seen:
            if int(self.started.numpy()) == 0:
                self.z.assign(flatten(self.opt.model_variables))
                self.started.assign(1)
            self._started_seen = True
        super().on_step_begin(iterations)

    def on_step_end(self, iterations: int) -> None:
        """Every τ local steps: consensus round and averaged batch-norm statistics."""
        opt = self.opt
        if iterations % opt.tau != 0:
            return
        result = consensus_round(flatten(opt.model_variables), self.dual.value(), self.z.value(),
                                 opt.rho, self.comm)
        self.z.assign(result.z)
        self.dual.assign(result.dual)
        if opt.x_restart == "z":
            assign_flat(opt.model_variables, result.z, opt)
        self.residuals.assign(tf.stack([result.primal_residual, result.dual_residual]))
        self.rounds.assign_add(1)
        model = opt.hooks.bound_model()
        stats = list(model.non_trainable_variables) if model is not None else []
        if stats:
            averaged = self.comm.grouped_allreduce([v.value() for v in stats], "mean",
                                                   name="dho2/admm/bn_stats")
            for var, value in zip(stats, averaged):
                var.assign(value)
            opt.hooks.sync_shadows()

    def check_hooks_ran(self, t: tf.Tensor) -> Any:
        """Update t needs ⌊t/τ⌋ consensus rounds behind it (run by ``on_step_end``)."""
        tau = self.opt.tau
        return tf.debugging.assert_less_equal(t // tau, tf.cast(self.rounds, t.dtype), message=(
            f"DHO2 mode='admm': more than tau={tau} local steps ran without a consensus round, "
            "so the ranks drift apart: optimizer.on_step_end() was not called after "
            "apply_gradients. Drive the loop with dho2_tf.training_loop(optimizer, model, loss, "
            "batch), or call on_step_end() after every update."))

    @contextlib.contextmanager
    def consensus_weights(self) -> Iterator[None]:
        """Temporarily put z into the model (for evaluation and curvature estimation)."""
        variables = self.opt.model_variables
        saved = flatten(variables)
        assign_flat(variables, self.z.value(), self.opt)
        try:
            yield
        finally:
            assign_flat(variables, saved, self.opt)

    def evaluation_weights(self) -> Any:
        """Evaluate the consensus z (see :meth:`consensus_weights`)."""
        return self.consensus_weights()

    def curvature_weights(self) -> Any:
        """Curvature is estimated (and checked) at the consensus z."""
        return self.consensus_weights()

    def eigenvalue_shift(self) -> float:
        return self.opt.rho

    def on_train_end(self) -> None:
        """Leave the consensus z in the model: that is the trained model."""
        assign_flat(self.opt.model_variables, self.z.value(), self.opt)

    def metrics(self) -> dict[str, float]:
        primal, dual = self.residuals.numpy()
        return {"admm_primal_residual": float(primal), "admm_dual_residual": float(dual),
                "admm_rounds": float(self.rounds.numpy())}
