"""The eager side of training with DHO2: one driver for what runs on the host between updates.

``fit`` drives it through :class:`dho2_tf.CurvatureRefresh`, a custom loop through
:func:`dho2_tf.training_loop`; both are thin shells over :class:`HostDriver`: its
:meth:`~HostDriver.start` (build, consistency check, binding, initial broadcast, or serving on a
pipelined curvature rank), :meth:`~HostDriver.before_step` and :meth:`~HostDriver.after_step`
around every update (the refresh schedule, the mode's hand-overs and consensus rounds),
:meth:`~HostDriver.finish` when training stops, and :meth:`~HostDriver.resync` after variables
changed outside a step. A loop wired by hand reaches the same driver through the optimizer's
``on_step_begin`` / ``on_step_end`` / ``on_train_end`` (:meth:`~HostDriver.begin`,
:meth:`~HostDriver.end`, :meth:`~HostDriver.finish`).

The mode's hooks do their own exchanges and return what the host must do with the optimizer as
data (:mod:`dho2_tf.modes.context`: refresh when due, install delivered pairs, average the
statistics, ...); :meth:`HostDriver.carry_out` does it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np
import tensorflow as tf

from dho2_tf import state_transfer
from dho2_tf.fosi_step import SkipLog
from dho2_tf.modes.context import (AverageStatistics, HostAction, InstallPairs, KeepPairs,
                                   RefreshIfDue, TriggerSent)
from dho2_tf.optimizer_state import StatShadows


class HostDriver:
    """The host side of one :class:`dho2_tf.DHO2`: the step count, the start sequence, the
    hooks around every update and the one rule that re-reads what the host keeps.

    Host caches (each mirrors a variable; ``None`` means "re-read at the next step"):

    * :attr:`iterations` mirrors ``optimizer.iterations`` (the updates done): the one host copy
      of the step count, advanced by :meth:`after_step`, so a step with nothing due reads no
      variable;
    * ``Curvature.host_refreshes`` (:mod:`dho2_tf.refresh`) mirrors ``state.refreshes``, the
      count the refresh schedule decides on;
    * the mode's own (:meth:`dho2_tf.modes.base.Mode.sync_host_state`): ``pipelined``'s
      ``triggers_sent`` mirrors ``state.refreshes`` plus a delivery still pending, ``admm``'s
      ``_started_seen`` mirrors ``admm_started``;
    * :attr:`shadows`: copies of the bound model's non-trainable variables, which a skipped
      step restores (the step graph keeps them equal to the statistics after each update).

    :meth:`forget` marks the counts unknown (each is re-read from its variable where it is
    next needed); :meth:`resync` forgets them, copies the statistics again and reads the step
    count: it is the one rule for "variables changed outside a step" (a checkpoint restored,
    ``set_weights``, ``import_state``, statistics averaged, the counter assigned).

    Attributes:
        iterations: the step count (``None``: unknown, read at the next step).
        driven_by: the :class:`dho2_tf.CurvatureRefresh` or :class:`dho2_tf.TrainingLoop`
            that called :meth:`start`, or ``None`` when the loop is wired by hand.
        weights_synced: whether rank 0's weights were broadcast (or the ranks were found to
            agree), so the first-step check has nothing to do.
        skips: the skipped steps already reported (:class:`dho2_tf.fosi_step.SkipLog`).
        shadows: the statistics' copies (:class:`dho2_tf.optimizer_state.StatShadows`).
        served: the refreshes this rank served in :meth:`start` (a pipelined curvature rank).
    """

    def __init__(self, opt: Any) -> None:
        """``opt``: the :class:`dho2_tf.DHO2` this driver drives."""
        self.opt = opt
        self.iterations: int | None = None
        self.driven_by: object | None = None
        self.weights_synced = False
        self.skips = SkipLog()
        self.shadows: StatShadows | None = None
        self.served: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ start and stop
    def start(self, model: tf.keras.Model, loss: Callable | str | None, batch: tuple, *,
              training: bool, broadcast_initial_state: bool, driven_by: object,
              fit: dict | None = None) -> bool:
        """The start of a run (``fit`` or a custom loop): build, compare the ranks'
        configurations (and ``fit``'s ``steps``/``epochs`` when given), bind ``model``,
        ``loss`` and the curvature ``batch``; then on a pipelined curvature rank serve
        refreshes until the update ranks stop (:attr:`served`), else :meth:`resync` and, with
        ``broadcast_initial_state``, copy rank 0's weights to the training ranks.

        Returns whether this rank trains (``False`` on a pipelined curvature rank).
        """
        opt = self.opt
        opt.build(model.trainable_variables)
        opt.verify_consistency(model, fit=fit)
        opt.bind(model, loss, batch, training=training)
        self.driven_by = driven_by
        self.served = []
        if opt.is_curvature_rank:
            self.served = opt.serve_curvature()
            return False
        self.resync()
        if broadcast_initial_state:
            self.broadcast_weights(model)
        return True

    def release(self, driven_by: object) -> None:
        """``driven_by`` stops driving (the loop is wired by hand again)."""
        if self.driven_by is driven_by:
            self.driven_by = None

    def broadcast_weights(self, model: tf.keras.Model, root: int = 0) -> None:
        """At step 0, copy the model's variables from ``root`` to the training ranks (the
        optimizer state is identical there at step 0, and sharded or rank-local later); the
        statistics' copies follow."""
        opt = self.opt
        if not opt.built or self.step_count() == 0:
            state_transfer.broadcast_weights(model.variables, opt.comm,
                                             opt.distribution.broadcast_group(opt.comm), root)
            self.sync_shadows()
        self.weights_synced = True

    # ------------------------------------------------------------------ around each update
    def before_step(self) -> None:
        """Before an update: the first-step weight check, the mode's hook (refresh when due,
        window jump, pipeline hand-over or delivery) and its actions."""
        opt = self.opt
        iterations = self.step_count()
        if not self.weights_synced:
            self.check_initial_weights(iterations)
        mode = opt.distribution
        if mode.checks_consistency_first:
            opt.ensure_consistency()
        self.carry_out(mode.on_step_begin(iterations), iterations)

    def after_step(self, steps: int = 1) -> None:
        """After ``steps`` updates (Keras may run several per call): advance the count, then
        the mode's hook (``admm``: the consensus round every τ steps) and its actions."""
        if self.iterations is None:
            self.iterations = self.read_step()   # it already counts the update(s)
        else:
            self.iterations += steps
        self.carry_out(self.opt.distribution.on_step_end(self.iterations), self.iterations)

    def finish(self) -> None:
        """When training stops: the mode's end (pipelined: drain a delivery, send the stop
        flag that releases the curvature ranks; admm: z into the model), then the last
        skipped-step report and the run's total."""
        self.carry_out(self.opt.distribution.on_train_end(), None)
        self.report_skipped()
        if self.opt.built:
            self.skips.summary(self.opt.comm.is_root)

    def begin(self, iterations: int | None) -> None:
        """The optimizer's ``on_step_begin``: ``iterations`` is the caller's step count; with
        ``None`` a loop wired by hand keeps none, so every count is re-read (:meth:`forget`)."""
        if iterations is not None:
            self.iterations = iterations
        elif self.driven_by is None:
            self.forget()
            self.ensure_shadows()
        self.before_step()

    def end(self, iterations: int | None) -> None:
        """The optimizer's ``on_step_end``: ``iterations`` is the count after the update
        (``None``: one more than :meth:`begin` saw); a loop wired by hand also gets the
        skipped steps logged."""
        if iterations is not None:
            self.iterations = iterations - 1
        self.after_step(1)
        if iterations is None and self.driven_by is None:
            self.report_skipped()
            self.iterations = None

    # ------------------------------------------------------------------ the sync rule
    def forget(self) -> None:
        """Every count the host keeps becomes unknown: the step count, the refresh count and
        the mode's copies are re-read from their variables where they are next needed."""
        self.iterations = None
        self.opt.curvature.forget()
        self.opt.distribution.sync_host_state()

    def resync(self) -> int:
        """After variables changed outside a step: :meth:`forget`, copy the statistics again
        (created for a newly bound model), and read the step count; returns it."""
        self.forget()
        if not self.ensure_shadows():
            self.sync_shadows()
        return self.step_count()

    def forget_caches(self) -> None:
        """After the optimizer's variables were replaced (``set_weights``, ``import_state``):
        drop the cached projections, then :meth:`resync`."""
        self.opt.workspace.projected_at.assign(-1)
        self.resync()

    def step_count(self) -> int:
        """The step count, read from ``optimizer.iterations`` when unknown."""
        if self.iterations is None:
            self.iterations = self.read_step()
        return self.iterations

    def read_step(self) -> int:
        """``optimizer.iterations`` (one variable read)."""
        return int(self.opt.iterations.numpy())

    # ------------------------------------------------------------------ host actions
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

    # ------------------------------------------------------------------ checks and reports
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

    def report_skipped(self) -> int:
        """Log a warning if steps were skipped since the last report; returns the count."""
        opt = self.opt
        if not opt.built:
            return 0
        return self.skips.report(int(opt.state.skipped.numpy()), opt.comm.is_root)

    # ------------------------------------------------------------------ statistics' copies
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
