"""The FOSI step on this rank's state shard, its non-finite guard, and the skipped-step log."""

from __future__ import annotations

import logging
from typing import Any, Callable

import tensorflow as tf

from dho2_tf import guard, hybrid
from dho2_tf.base_rules import BaseRule
from dho2_tf.distributed.comm import Communicator, Group
from dho2_tf.flat import FlatSpec, assign_add_flat
from dho2_tf.hyperparameters import Hyperparameters
from dho2_tf.optimizer_state import OptimizerState, Workspace

logger = logging.getLogger(__name__)


class FosiStep:
    """θ ← θ + δ from the rank-averaged gradient shard, or nothing when δ is not finite.

    Math: δ_r from :func:`dho2_tf.hybrid.hybrid_displacement` (with the new momentum
    coefficients and base slots), with the base learning-rate scale c and Newton step size α
    of the divergence guard (:mod:`dho2_tf.guard`, when ``hp.guard``); δ = gather(δ_r), the
    full displacement [n] (the mode's all-gather, or δ_r itself when the state is full); then,
    iff the step is finite (``HybridResult.finite``: ‖Ḡ‖² and the K-vector δ is formed from are
    finite; no pass over δ), θ ← θ + δ (one ``assign_add`` per variable) and the momentum, the
    slots and the guard's state take their new values. Every rank holds the same ‖Ḡ‖² and
    K-vectors, so all take the same branch. Otherwise nothing changes: the bound model's
    non-trainable statistics (updated by the forward pass) are restored from their copies and
    ``skipped`` grows by one. The base rule updates its slots in place (one fused pass) only
    once every rank knows the step (Adam: Ḡ) is finite.

    Cost: full-length passes per step (element-wise kernels over n entries, ≤ marking an
    assignment TF may do by moving a buffer; passes over V [K, n] apart), besides the mode's
    flatten and collectives (replicated: one concat):

    ============  ==================================  ======================================
    base          before the fused in-place step      now
    ============  ==================================  ======================================
    sgd           5 + 2 V  (−L·G, combine, Σδ,        4-5 + 2 V  (‖Ḡ‖², out ← −Vᵀk ≤ 1,
                  split, assign_add)                  fused kernel, split, assign_add)
    momentum      7-8 + 2 V  (+ B update 2,           4-5 + 2 V
                  slot assign ≤ 1)
    nesterov      9-10 + 2 V  (+ G + β·B 2)           4-5 + 2 V
    adam          7 + 4 V  (g₂, zero, fused Adam,     7 + 4 V  (‖Ḡ‖² instead of Σδ)
                  combine, Σδ, split, assign_add)
    ============  ==================================  ======================================

    The squared norm that serves as the finite check also feeds the guard. The concat of the
    gradients and the split of δ into the variables remain: the state is one flat vector.
    """

    def __init__(self, state: OptimizerState, workspace: Workspace, rule: BaseRule,
                 spec: FlatSpec, hp: Hyperparameters, logs: Any) -> None:
        """``hp`` gives α, the ``nonfinite`` policy, ``max_consecutive_skips`` and the guard
        settings; ``logs`` (:class:`dho2_tf.step_hooks.StepHooks`) has ``log_skipped_step``,
        called eagerly with (step, skipped so far) for each skipped step, and
        ``log_guard_trip``, with (step, level, ratio, trips) for each guard trip."""
        self.state, self.workspace, self.rule, self.spec = state, workspace, rule, spec
        self.alpha, self.nonfinite = hp.alpha, hp.nonfinite
        self.max_consecutive_skips = hp.max_consecutive_skips
        self.guard_factor = hp.guard     # κ; 0: no guard
        self.log_skip, self.log_trip = logs.log_skipped_step, logs.log_guard_trip

    def metrics(self) -> dict[str, float]:
        """The guard's scalars (:func:`dho2_tf.guard.guard_metrics`)."""
        return guard.guard_metrics(self.state)

    def __call__(self, g_r: tf.Tensor, variables: list[tf.Variable], learning_rate: tf.Tensor,
                 step: tf.Tensor, projection: tuple[Communicator, Group | None],
                 stats: list[tuple[tf.Variable, tf.Variable]],
                 gather: Callable[[tf.Tensor], tf.Tensor] | None = None) -> None:
        """Apply the step (graph-safe).

        Args:
            g_r: float [s], the rank-averaged gradient on this rank's state shard.
            variables: the model variables, in the flat order.
            learning_rate: the base learning rate of this step.
            step: the 1-based step number (Adam's bias correction).
            projection: communicator and group completing the K-vector projections.
            stats: (statistic, copy) pairs of the bound model's non-trainable variables.
            gather: maps δ_r [s] to δ [n]; ``None`` when s = n.
        """
        st, ws, rule = self.state, self.workspace, self.rule
        comm, group = projection
        slot_coeffs = st.base_coeffs if st.base_coeffs is not None else \
            tf.zeros([st.newton_coeffs.shape[0]], g_r.dtype)
        step_state = hybrid.StepState(
            st.newton_momentum, st.newton_coeffs, st.newton_decay,
            [] if st.in_place and not rule.linear else [v.value() for v in st.base_slots],
            slot_coeffs, ws.projected, tf.equal(ws.projected_at, st.refreshes))
        curvature = hybrid.CurvatureSubspace(st.eigenvectors, st.gram, st.rates, st.scale)
        in_place = None
        if st.in_place:
            def in_place(g: tf.Tensor, lr: tf.Tensor, init: tf.Tensor | None) -> tf.Tensor:
                if rule.linear:
                    return rule.apply_linear_in_place(ws.base_out, st.base_slots, g, lr, init)
                return rule.apply_in_place(ws.base_out, st.base_slots, g, lr, step)

        decisions: list[guard.GuardDecision] = []

        def control(sq_norm: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            decisions.append(guard.guard_decision(
                sq_norm, st.guard_average, st.guard_reference, st.guard_level,
                st.guard_window, st.refreshes, st.scale, self.alpha, self.guard_factor))
            return decisions[-1].scale, decisions[-1].alpha

        result = hybrid.hybrid_displacement(
            g_r, step_state, curvature, rule, learning_rate, self.alpha, step, comm,
            in_place=in_place, control=control if self.guard_factor else None, process_set=group)
        delta = result.delta_r if gather is None else gather(result.delta_r)
        finite = result.finite
        if self.nonfinite == "raise":
            tf.debugging.assert_equal(finite, True, message=(
                "DHO2: the averaged gradient (or the base step) holds NaN/Inf at this step; "
                "stopping because nonfinite='raise'. Check the input batch and learning rate."))
        refreshes = st.refreshes.value()

        def commit() -> None:
            assign_add_flat(variables, delta, self.spec)
            st.newton_coeffs.assign(result.momentum_coeffs)
            st.newton_decay.assign(result.momentum_decay)
            if st.base_coeffs is not None:
                st.base_coeffs.assign(result.slot_coeffs)
            ws.projected.assign(result.cached)
            ws.projected_at.assign(refreshes)
            for slot, value in zip(st.base_slots, result.slots_r):
                slot.assign(value)
            for stat, shadow in stats:
                shadow.assign(stat)
            ws.consecutive_skips.assign(0)
            if decisions:
                self._commit_guard(decisions[-1], step)

        def skip() -> None:
            for stat, shadow in stats:
                stat.assign(shadow)
            skipped = st.skipped.assign_add(1)
            run = ws.consecutive_skips.assign_add(1)
            tf.py_function(self.log_skip, [step, skipped], [])
            tf.debugging.assert_less_equal(
                run, tf.constant(self.max_consecutive_skips, tf.int64),
                message=too_many_skips_message(self.max_consecutive_skips))

        tf.cond(finite, commit, skip)

    def _commit_guard(self, decision: guard.GuardDecision, step: tf.Tensor) -> None:
        """Store the guard's new state; count and log a trip."""
        st = self.state
        st.guard_average.assign(decision.average)
        st.guard_reference.assign(decision.reference)
        st.guard_level.assign(decision.level)
        st.guard_window.assign(decision.window)

        def trip() -> None:
            trips = st.guard_trips.assign_add(1)
            tf.py_function(self.log_trip, [step, decision.level, decision.ratio, trips], [])

        tf.cond(decision.tripped, trip, lambda: None)


def too_many_skips_message(limit: int) -> str:
    """The error when more than ``limit`` consecutive steps were skipped."""
    return (f"DHO2 skipped more than max_consecutive_skips={limit} consecutive steps: the "
            "averaged gradient (or the base step) keeps holding NaN/Inf, so training stops "
            "instead of leaving the weights frozen. Check the inputs and labels for NaN/Inf and "
            "lower the learning rate; raise `max_consecutive_skips` if such runs are expected.")


class SkipLog:
    """Skipped steps reported so far, and their log lines (rank 0).

    One line per skipped step would flood the log of a run that keeps skipping, so the step
    graph logs the first skip and then every ``every``-th; :meth:`report` sums up the skips
    since the last report (each epoch) and :meth:`summary` gives the run's total at its end.
    """

    def __init__(self, every: int = 100) -> None:
        self.every = every
        self.reported = 0

    def log_step(self, step: tf.Tensor, skipped: tf.Tensor, is_root: bool) -> None:
        """Log a skipped step if it is the first or an ``every``-th one (called from the step
        graph)."""
        total = int(skipped.numpy())
        if is_root and (total == 1 or total % self.every == 0):
            logger.warning("DHO2 skipped step %d: the averaged gradient or base step holds "
                           "NaN/Inf (%d skipped so far; logged again every %d skips)",
                           int(step.numpy()), total, self.every)
        self.reported = max(self.reported, total)

    def report(self, skipped: int, is_root: bool) -> int:
        """Log a warning if steps were skipped since the last report; returns ``skipped``."""
        if skipped > self.reported and is_root:
            logger.warning("DHO2 skipped %d step(s) with a non-finite gradient or base step "
                           "(%d so far)", skipped - self.reported, skipped)
        self.reported = skipped
        return skipped

    def summary(self, is_root: bool) -> None:
        """At the end of training: the run's total of skipped steps, if any (rank 0)."""
        if self.reported and is_root:
            logger.warning("DHO2 skipped %d step(s) in total with a non-finite gradient or base "
                           "step (weights and statistics unchanged at each)", self.reported)
