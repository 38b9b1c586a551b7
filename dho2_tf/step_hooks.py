"""What a traced training step calls back into: the wiring checks of a hand-wired loop and the
log lines of skipped steps and guard trips.

A loop wired by hand (neither :class:`dho2_tf.CurvatureRefresh` nor :func:`dho2_tf.training_loop`
drives the optimizer) gets checks instead of silence: a step traced after ``bind`` fails when
the hook its mode needs was not called (:meth:`StepHooks.check_wiring`), a step traced before
it warns once that no curvature source is bound (:meth:`StepHooks.check_source`). The eager
side of training (the step count, the refresh schedule, the modes' hooks) is
:class:`dho2_tf.host_driver.HostDriver`.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from dho2_tf import guard, hybrid, refresh


class StepHooks:
    """The step graph's side of one optimizer's hooks.

    Attributes:
        source_warned: whether the missing-curvature-source warning was given.
    """

    def __init__(self, opt: Any) -> None:
        """``opt``: the :class:`dho2_tf.DHO2` whose step calls these."""
        self.opt = opt
        self.source_warned = False

    def check_wiring(self) -> list:
        """In the step graph of a hand-wired loop: the checks that fail fast when a hook the
        mode needs was not called (graph-safe; nothing for the drivers, which call them all).

        * no curvature source bound when the step was traced: :meth:`check_source`;
        * a refresh overdue: refresh j is due before update t_j = W − 1 + j·T (pipelined: it
          lands Δ steps later), so update t with t ≥ t_j + Δ while only j refreshes ran means
          ``on_step_begin`` was not called (with the adaptive schedule, whose later intervals
          the host stretches, only the first refresh is checked);
        * ``admm``: update t needs ⌊t/τ⌋ consensus rounds behind it, which ``on_step_end``
          runs.

        Cost: two or three scalar variable reads and comparisons in the step, no host sync.
        Returns the assertion ops (empty when eager or unchecked): the step runs under a
        control dependency on them, so the update they refuse is never applied.
        """
        opt = self.opt
        if opt.binding is None:
            self.check_source()
            return []
        if opt.driver.driven_by is not None or opt.is_curvature_rank:
            return []
        hp, mode = opt.hp, opt.distribution
        t = opt.iterations
        refreshes = tf.cast(opt.state.refreshes, tf.int64)   # hybrid.next_refresh_step, in graph
        due = tf.maximum(hp.warmup - 1 + refreshes * hp.refresh_every, 0) + mode.refresh_delay()
        if hp.max_refresh_every is not None:
            # The adaptive schedule may stretch an interval after its staleness check (the host
            # decides); only the first refresh, at W − 1, is due at a known step.
            due = tf.where(refreshes > 0, tf.int64.max, due)
        checks = [tf.debugging.assert_less(t, due, message=(
            "DHO2: a curvature refresh was due before this update but optimizer.on_step_begin() "
            "was not called, so the run would train without curvature. Drive the loop with "
            "dho2_tf.training_loop(optimizer, model, loss, batch) (loop.step(train_step, x, y)), "
            "or call on_step_begin() before and on_step_end() after every apply_gradients.")),
                  mode.check_hooks_ran(t)]
        return [op for op in checks if op is not None]

    def log_skipped_step(self, step: tf.Tensor, skipped: tf.Tensor) -> None:
        """Log one skipped step on rank 0 (called from the step graph)."""
        self.opt.driver.skips.log_step(step, skipped, self.opt.comm.is_root)

    def log_guard_trip(self, step: tf.Tensor, level: tf.Tensor, ratio: tf.Tensor,
                       trips: tf.Tensor) -> None:
        """Log one guard trip on rank 0 (called from the step graph)."""
        guard.log_trip(step, level, ratio, trips, self.opt.comm.is_root, self.opt.hp.guard)

    def check_source(self) -> None:
        """In a step traced before ``bind`` (from :meth:`check_wiring`): once the first refresh
        is due, warn (every rank, eagerly, once) that nothing is bound and run the rank check
        the ``fit`` path runs.
        A cond on two scalars; only steps traced with no binding carry it."""
        opt = self.opt
        due = hybrid.next_refresh_step(0, opt.hp.warmup, opt.hp.refresh_every)
        checked = opt.workspace.source_checked
        pending = tf.logical_and(opt.iterations >= due, tf.logical_not(checked))

        def check() -> None:
            tf.py_function(self._warn_no_source, [], [])
            checked.assign(True)

        tf.cond(pending, check, lambda: None)

    def _warn_no_source(self) -> None:
        opt = self.opt
        if opt.curvature.binding is not None or self.source_warned:
            return
        self.source_warned = True
        refresh.warn_no_curvature_source(
            hybrid.next_refresh_step(0, opt.hp.warmup, opt.hp.refresh_every), opt.rule.name)
        opt.ensure_consistency()
