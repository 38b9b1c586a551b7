"""The eager side of a training loop with DHO2: what runs before and after each update.

``fit`` drives it through :class:`dho2_tf.CurvatureRefresh`, a custom loop through
:func:`dho2_tf.training_loop`; both call the optimizer's ``bind``, ``on_step_begin``,
``on_step_end`` and ``on_train_end``, which delegate here. The hooks receive the step count as a
Python int when the caller keeps one, so a step with nothing due reads no variable.

A loop wired by hand (neither driver) gets two checks instead of silence: a step traced after
``bind`` fails when the hook its mode needs was not called (:meth:`StepHooks.check_wiring`), and
the first step of a multi-rank run fails when the ranks hold different weights
(:meth:`StepHooks.check_initial_weights`).

The mode's hooks do their own exchanges and return what the host side must do with the
optimizer as data (:mod:`dho2_tf.modes.context`: refresh when due, install delivered pairs,
average the statistics, ...); :meth:`StepHooks.carry_out` does it.
"""

from __future__ import annotations

import types
from typing import Any, Iterable

import numpy as np
import tensorflow as tf

from dho2_tf import guard, hybrid, refresh, state_transfer
from dho2_tf.fosi_step import SkipLog
from dho2_tf.modes.context import (AverageStatistics, HostAction, InstallPairs, KeepPairs,
                                   RefreshIfDue, TriggerSent)
from dho2_tf.optimizer_state import StatShadows


class StepHooks:
    """Host-side bookkeeping of one optimizer's eager hooks.

    Attributes:
        begun_at: the step count :meth:`begin` saw, until :meth:`end`.
        skips: the skipped steps already reported (:class:`dho2_tf.fosi_step.SkipLog`).
        shadows: copies of the bound model's non-trainable variables a skipped step restores.
        source_warned: whether the missing-curvature-source warning was given.
        driver: the object that calls every hook (``CurvatureRefresh``, the custom-loop
            driver), or ``None`` when the loop is wired by hand.
        weights_synced: whether rank 0's weights were broadcast (or the ranks were found to
            agree), so the first-step check has nothing to do.
    """

    def __init__(self, opt: Any) -> None:
        """``opt``: the :class:`dho2_tf.DHO2` whose hooks these are."""
        self.opt = opt
        self.begun_at: int | None = None
        self.skips = SkipLog()
        self.shadows: StatShadows | None = None
        self.source_warned = False
        self.driver: object | None = None
        self.weights_synced = False

    def begin(self, iterations: int | None) -> None:
        """Before an update: the mode's refresh, window jump or pipeline hand-over."""
        opt = self.opt
        if iterations is None:
            iterations = int(opt.iterations.numpy())
            opt.curvature.forget()
            self.ensure_shadows()
        if not self.weights_synced:
            self.check_initial_weights(iterations)
        self.begun_at = iterations
        mode = opt.distribution
        if mode.checks_consistency_first and not opt.consistency_checked:
            opt.verify_consistency(opt.curvature.binding["model"])
        self.carry_out(mode.on_step_begin(iterations), iterations)

    def end(self, iterations: int | None) -> None:
        """After an update: the mode's ADMM round; logs skipped steps when counting itself."""
        if iterations is None:
            begun = self.begun_at
            iterations = int(self.opt.iterations.numpy()) if begun is None else begun + 1
            self.begun_at = None
            self.report_skipped()
        self.carry_out(self.opt.distribution.on_step_end(iterations), iterations)

    def sync(self) -> int:
        """Re-read what is kept in Python after variables changed outside a step (restored,
        averaged) and copy the statistics; returns the step count."""
        opt = self.opt
        opt.curvature.forget()
        opt.distribution.sync_host_state()
        if not self.ensure_shadows():
            self.sync_shadows()
        return int(opt.iterations.numpy())

    def train_end(self) -> None:
        """When training stops: the mode's end (pipelined: release the curvature ranks), then
        the last skipped-step report and the run's total."""
        self.carry_out(self.opt.distribution.on_train_end(), None)
        self.report_skipped()
        if self.opt.built:
            self.skips.summary(self.opt.comm.is_root)

    def check_initial_weights(self, iterations: int) -> None:
        """At the first update of a run on several training ranks, unless rank 0's weights were
        broadcast: compare the ranks' weights (one small allgather, once) and raise ValueError
        on every rank when they differ.

        Math: every rank sends s = (Σ_i θ_i, Σ_i θ_i², Σ_i θ_i·sin i) in float64 (numpy, the
        same reduction order everywhere); the ranks agree iff all s are equal.
        """
        opt = self.opt
        group = opt.distribution.broadcast_group(opt.comm)
        if iterations > 0 or opt.comm.group_size(group) == 1:
            self.weights_synced = True
            return
        theta = np.concatenate([np.ravel(v.numpy()).astype(np.float64)
                                for v in opt.model_variables])
        mine = [theta.sum(), np.square(theta).sum(), (theta * np.sin(np.arange(theta.size))).sum()]
        every = opt.comm.allgather(tf.constant([mine], tf.float64),
                                   name="dho2/hooks/initial_weights", process_set=group).numpy()
        self.weights_synced = True
        if not np.all(every == every[0]):
            raise ValueError(
                "DHO2: the training ranks start from different weights (they were never "
                "broadcast from rank 0), so each rank would train its own model. Drive the loop "
                "with dho2_tf.training_loop(optimizer, model, loss, batch), which broadcasts "
                "them, or call optimizer.broadcast_state(model) before the first step. "
                f"Received: weight sums per rank {[float(row[0]) for row in every]}")

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
        if self.driver is not None or opt.is_curvature_rank:
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

    def carry_out(self, actions: Iterable[HostAction], iterations: int | None) -> None:
        """Do what the mode's hook asked, in order (before update ``iterations``):

        * :class:`RefreshIfDue`: when the schedule says so (:meth:`refresh.Curvature.due`), the
          mode's ``before_refresh``, then the refresh;
        * :class:`InstallPairs`: fold the momenta out of V, then install the pairs;
        * :class:`KeepPairs`: count a refresh that installed nothing;
        * :class:`TriggerSent`: record the hand-over step (``triggers``);
        * :class:`AverageStatistics`: :meth:`average_statistics`.
        """
        curvature = self.opt.curvature
        for action in actions:
            if isinstance(action, RefreshIfDue):
                if curvature.due(iterations):
                    self.opt.distribution.before_refresh(iterations)
                    curvature.refresh()
            elif isinstance(action, InstallPairs):
                curvature.materialize_momentum()                    # V is about to change
                curvature.install(action.eigenvalues, action.vectors_r, action.gram,
                                  status=action.status)
            elif isinstance(action, KeepPairs):
                curvature.count(installed=False, status=action.status)
            elif isinstance(action, TriggerSent):
                curvature.triggers.append(action.step)
            elif isinstance(action, AverageStatistics):
                self.average_statistics(action.name)
            else:
                raise TypeError(f"unknown host action {action!r}")

    def average_statistics(self, name: str) -> None:
        """The bound model's non-trainable variables ← their mean over the ranks (one grouped
        allreduce named ``name``), then copied as the values a skipped step restores."""
        model = self.bound_model()
        stats = list(model.non_trainable_variables) if model is not None else []
        if not stats:
            return
        state_transfer.average_variables(stats, self.opt.comm, name)
        self.sync_shadows()

    def forget_caches(self) -> None:
        """After the optimizer's variables were replaced: drop the cached projections and
        re-read everything kept in Python (:meth:`sync`)."""
        self.opt.workspace.projected_at.assign(-1)
        self.sync()

    def bound_model(self) -> tf.keras.Model | None:
        """The model of the curvature binding, if any."""
        binding = self.opt.curvature.binding
        return binding["model"] if binding else None

    def ensure_shadows(self) -> bool:
        """Create the statistics' copies for the bound model (a no-op while it is unchanged);
        returns whether they were created now. Steps traced before they existed do not restore
        statistics, so this runs after ``bind`` and before the first step."""
        model = self.bound_model()
        if model is None or (self.shadows is not None and self.shadows.model is model):
            return False
        self.shadows = StatShadows(model)
        return True

    def sync_shadows(self) -> None:
        """copy ← statistic, after the statistics were changed outside a step."""
        if self.shadows is not None:
            self.shadows.sync()

    def shadow_pairs(self) -> list[tuple[tf.Variable, tf.Variable]]:
        """(statistic, copy) pairs a step restores when skipped (none for an unbound model)."""
        model, shadows = self.bound_model(), self.shadows
        return shadows.pairs if shadows is not None and shadows.model is model else []

    def log_skipped_step(self, step: tf.Tensor, skipped: tf.Tensor) -> None:
        """Log one skipped step on rank 0 (called from the step graph)."""
        self.skips.log_step(step, skipped, self.opt.comm.is_root)

    def log_guard_trip(self, step: tf.Tensor, level: tf.Tensor, ratio: tf.Tensor,
                       trips: tf.Tensor) -> None:
        """Log one guard trip on rank 0 (called from the step graph)."""
        guard.log_trip(step, level, ratio, trips, self.opt.comm.is_root, self.opt.hp.guard)

    def report_skipped(self) -> int:
        """Log a warning if steps were skipped since the last report; returns the count."""
        opt = self.opt
        if not opt.built:
            return 0
        return self.skips.report(int(opt.state.skipped.numpy()), opt.comm.is_root)

    def check_source(self) -> None:
        """In a step traced before ``bind`` (from :meth:`check_wiring`): once the first refresh is due, warn (every rank,
        eagerly, once) that nothing is bound and run the rank check the ``fit`` path runs.
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
        if not opt.consistency_checked:
            opt.verify_consistency(types.SimpleNamespace(
                trainable_variables=list(opt.model_variables), name="model"))
