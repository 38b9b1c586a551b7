"""When the curvature is refreshed: FOSI's fixed schedule, or an adaptive one that stretches the
interval while the installed eigenpairs still fit the Hessian.

Fixed (``max_refresh_every=None``, the default): refresh j before update t iff
t ≥ W − 1 + j·T (:func:`dho2_tf.hybrid.next_refresh_step`; W = ``warmup``, T = ``refresh_every``).

Adaptive (``max_refresh_every`` = T_max ≥ T, tolerance τ = ``staleness_tol``): the first refresh
is the fixed schedule's. After a refresh at step t_r, a staleness check runs at t_r + T,
t_r + 2T, …: one block HVP of the installed eigenvectors measures

    s = max(max_j |θ_j − λ_j|, max_j ‖H̄y_j − θ_j y_j‖ − r₀) / max_j |θ_j|

over the extreme Ritz pairs (θ_j, y_j) of the current H̄ in span(V)
(:meth:`dho2_tf.curvature.warm_start.BlockRitzProgram.check`; λ the installed eigenvalues, r₀
their largest residual when they were installed, 0 after a restore): s = 0 at the weights of
the refresh and grows as the curvature drifts or the eigenvectors turn away. If
s > τ the refresh runs now (continuing from the check's block HVP when the refresh is warm);
otherwise the interval is stretched to the next check. A refresh runs without a check once
t − t_r ≥ T_max. s comes from reduced values broadcast from the group root, so every rank takes
the same decision and issues the same collectives.

:meth:`RefreshSchedule.request_refresh` asks for a refresh before the next update, whatever the
schedule says (for a guard in the step that sees the curvature go wrong); every rank must call it
at the same step. In the fixed schedule the requested refresh takes the place of the next
scheduled one (the schedule counts refreshes).
"""

from __future__ import annotations

import logging
import math
from typing import Callable

from dho2_tf import hybrid

logger = logging.getLogger(__name__)


class RefreshSchedule:
    """The refresh decisions of one optimizer (host-side, identical on every rank).

    Args:
        warmup: W. refresh_every: T.
        max_refresh_every: T_max ≥ T for the adaptive schedule; ``None`` for the fixed one.
        staleness_tol: τ > 0.
        is_root: whether this rank logs the decisions.

    Attributes:
        checks: staleness checks run so far (this process).
        stretched: checks that stretched the interval instead of refreshing.
        staleness: s of the latest check (``nan`` before the first).
        interval: steps between the last two refreshes (``None`` before the second).
        requested: the reason of a pending :meth:`request_refresh`, or ``None``.
        installed_residual: r₀, the largest residual of the installed pairs when installed.
    """

    def __init__(self, warmup: int, refresh_every: int, max_refresh_every: int | None,
                 staleness_tol: float, is_root: bool = False) -> None:
        self.warmup, self.refresh_every = warmup, refresh_every
        self.max_refresh_every, self.staleness_tol = max_refresh_every, staleness_tol
        self.is_root = is_root
        self.checks = self.stretched = self.requests = 0
        self.staleness = math.nan
        self.interval: int | None = None
        self.requested: str | None = None
        self.last_refresh_step: int | None = None
        self.next_check: int | None = None
        self.known_refreshes: int | None = None
        self.installed_residual = 0.0

    @property
    def adaptive(self) -> bool:
        """Whether the interval adapts (``max_refresh_every`` is set)."""
        return self.max_refresh_every is not None

    def request_refresh(self, reason: str) -> None:
        """Make the next :meth:`due` true (every rank must call it at the same step)."""
        self.requested = str(reason)
        self.requests += 1
        if self.is_root:
            logger.info("DHO2 curvature refresh requested: %s", reason)

    def sync(self, refreshes: int, iterations: int) -> None:
        """Adopt the refresh count read from the state; a count or step this schedule did not
        see (a restored checkpoint) restarts the adaptive interval at ``iterations``."""
        if refreshes == self.known_refreshes and (
                self.last_refresh_step is None or iterations >= self.last_refresh_step):
            return
        self.known_refreshes = refreshes
        self.last_refresh_step = iterations if refreshes > 0 else None
        self.next_check = None
        self.installed_residual = 0.0

    def due(self, iterations: int, refreshes: int,
            check: Callable[[int], float | None]) -> bool:
        """Whether a refresh runs before update ``iterations``; ``check(iterations)`` returns
        the staleness s (``None``: no check possible, refresh) and is called only at a check
        point of the adaptive schedule."""
        if self.requested is not None:
            return True
        first = hybrid.next_refresh_step(refreshes, self.warmup, self.refresh_every)
        if not self.adaptive or refreshes == 0 or self.last_refresh_step is None:
            return iterations >= first
        last = self.last_refresh_step
        next_check = self.next_check if self.next_check is not None else last + self.refresh_every
        if iterations < next_check:
            return False
        if iterations - last >= self.max_refresh_every:
            self._log(iterations, "refresh: %d steps since the last one reach max_refresh_every",
                      iterations - last)
            return True
        staleness = check(iterations)
        self.checks += 1
        self.staleness = math.inf if staleness is None else float(staleness)
        if not self.staleness <= self.staleness_tol:
            self._log(iterations, "staleness %.3g > %.3g: refresh now", self.staleness,
                      self.staleness_tol)
            return True
        self.stretched += 1
        self.next_check = min(iterations + self.refresh_every, last + self.max_refresh_every)
        self._log(iterations, "staleness %.3g <= %.3g: keep the eigenpairs, next check at "
                  "step %d", self.staleness, self.staleness_tol, self.next_check)
        return False

    def refreshed(self, iterations: int | None, refreshes: int,
                  residual: float | None = None) -> None:
        """Record a refresh before update ``iterations``; ``refreshes`` is the count after it,
        ``residual`` the largest residual of the pairs it installed (``None``: none installed,
        the previous pairs stay)."""
        if residual is not None:
            self.installed_residual = float(residual)
        if iterations is not None:
            if self.last_refresh_step is not None:
                self.interval = iterations - self.last_refresh_step
            self.last_refresh_step = iterations
        self.next_check = None
        self.requested = None
        self.known_refreshes = refreshes

    def metrics(self) -> dict[str, float]:
        """``refresh_checks``, ``refresh_stretched``, ``staleness``, ``refresh_interval`` and
        ``refresh_requests`` (the adaptive ones only with an adaptive schedule)."""
        out = {"refresh_requests": float(self.requests)}
        if self.interval is not None:
            out["refresh_interval"] = float(self.interval)
        if self.adaptive:
            out.update(refresh_checks=float(self.checks), refresh_stretched=float(self.stretched))
            if not math.isnan(self.staleness):
                out["staleness"] = float(self.staleness)
        return out

    def _log(self, iterations: int, message: str, *args: object) -> None:
        if self.is_root:
            logger.info("DHO2 step %d: " + message, iterations, *args)
