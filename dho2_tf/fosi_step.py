"""The FOSI step on this rank's state shard, its non-finite guard, and the skipped-step log."""

from __future__ import annotations

import logging
from typing import Callable

import tensorflow as tf

from dho2_tf import hybrid
from dho2_tf.base_rules import BaseRule
from dho2_tf.distributed.comm import Communicator, Group
from dho2_tf.flat import FlatSpec, assign_add_flat
from dho2_tf.hyperparameters import Hyperparameters
from dho2_tf.optimizer_state import OptimizerState, Workspace

logger = logging.getLogger(__name__)


class FosiStep:
    """θ ← θ + δ from the rank-averaged gradient shard, or nothing when δ is not finite.

    Math: δ_r from :func:`dho2_tf.hybrid.hybrid_displacement` (with the new momentum
    coefficients and base slots); δ = gather(δ_r), the full displacement [n] (the mode's
    all-gather, or δ_r itself when the state is full); then, iff Σδ is finite (no entry of δ is
    NaN/Inf and the step is not so large that its sum overflows), θ ← θ + δ (one ``assign_add``
    per variable) and the momentum and the slots take their new values. Every rank holds the
    same δ, so all take the same branch. Otherwise nothing changes: the bound model's
    non-trainable statistics (updated by the forward pass) are restored from their copies and
    ``skipped`` grows by one. Adam updates its slots in place (one fused pass) once every rank
    knows Ḡ is finite, so only a base step that overflows with a finite gradient keeps its slot
    update.
    """

    def __init__(self, state: OptimizerState, workspace: Workspace, rule: BaseRule,
                 spec: FlatSpec, hp: Hyperparameters,
                 log_skip: Callable[[tf.Tensor, tf.Tensor], None]) -> None:
        """``hp`` gives α, the ``nonfinite`` policy and ``max_consecutive_skips``; ``log_skip``
        is called eagerly with (step, skipped so far) for each skipped step."""
        self.state, self.workspace, self.rule, self.spec = state, workspace, rule, spec
        self.alpha, self.nonfinite = hp.alpha, hp.nonfinite
        self.max_consecutive_skips = hp.max_consecutive_skips
        self.log_skip = log_skip

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
            [] if st.in_place else [v.value() for v in st.base_slots],
            slot_coeffs, ws.projected, tf.equal(ws.projected_at, st.refreshes))
        curvature = hybrid.Curvature(st.eigenvectors, st.gram, st.rates, st.scale)
        in_place = None
        if st.in_place:
            def in_place(g2: tf.Tensor, lr: tf.Tensor) -> tf.Tensor:
                return rule.apply_in_place(ws.base_out, st.base_slots, g2, lr, step)

        result = hybrid.hybrid_displacement(
            g_r, step_state, curvature, rule, learning_rate, self.alpha, step, comm,
            in_place=in_place, process_set=group)
        delta = result.delta_r if gather is None else gather(result.delta_r)
        finite = hybrid.sum_finite(delta)
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
