"""DHO2's distribution modes, one module each.

==============  =========================================  ==================================
mode            collectives per step                       parameter-sized state per rank
==============  =========================================  ==================================
``sharded``     reduce-scatter Ḡ (n), allreduce V_r Ḡ_r     (slots + 1 + K)·n/P
                (K), [Adam: allreduce V_r u_r (K)],
                all-gather δ (n): 3 or 4, dependent
``replicated``  one allreduce of Ḡ (n), as a data-parallel  (slots + 1 + K)·n
                Keras optimizer
``faithful``    one allreduce of Ḡ (n); window rule         (slots + 3 + K)·n
``pipelined``   those of ``sharded``, within U              (slots + 1 + K)·n/P_U (U ranks)
``admm``        one allreduce (n + 1) every τ steps         (slots + 3 + K)·n
==============  =========================================  ==================================

(slots: 0 sgd, 1 momentum/nesterov, 2 Adam; K = k + ℓ.) Every mode makes two passes over its
V per step with sgd/momentum/nesterov and four with Adam (see :mod:`dho2_tf.hybrid`).

``auto`` (the optimizer's default) is not a mode of its own: at ``build`` it becomes
``replicated`` when that layout's state, plus the curvature basis of a refresh, fits the
optimizer's ``memory_budget`` (:func:`replicated_state_bytes`), else ``sharded``
(:func:`choose_layout`). The rule does not depend on the number of ranks, so every rank, and a
run resumed with another world size, makes the same choice.

This module is the registry: which modes exist (:data:`MODES`), which options each accepts
(:func:`check_mode_options`, used when the hyper-parameters are validated) and the mode object
of a configuration (:func:`make_mode`). Nothing here, nor in the modes, knows the optimizer.
"""

from __future__ import annotations

import logging
from typing import Any

from dho2_tf.modes.admm import AdmmMode
from dho2_tf.modes.base import Mode, ShardedMode
from dho2_tf.modes.context import ModeContext, StateVariable, StepPlan
from dho2_tf.modes.faithful import FaithfulMode
from dho2_tf.modes.pipelined import PipelinedMode
from dho2_tf.modes.replicated import ReplicatedMode

logger = logging.getLogger(__name__)

MODES: dict[str, type[Mode]] = {
    "sharded": ShardedMode,
    "replicated": ReplicatedMode,
    "faithful": FaithfulMode,
    "pipelined": PipelinedMode,
    "admm": AdmmMode,
}

#: What ``mode=`` accepts: a mode, or ``"auto"`` (resolved by :func:`choose_layout`).
MODE_CHOICES: tuple[str, ...] = ("auto", *MODES)


def refresh_basis_rows(hp: Any) -> int:
    """Rows of the transient curvature basis of a refresh: the Lanczos order m, or the warm
    refresh's 4(K + p) rows (Q₀, H̄Q₀, Q₁, H̄Q₁) when larger and the block program is used."""
    if hp.refresh_method == "warm" or hp.max_refresh_every is not None:
        return max(hp.lanczos_order, 4 * (hp.num_pairs + hp.warm_extra))
    return hp.lanczos_order


def replicated_state_bytes(n: int, num_slots: int, num_pairs: int, basis_rows: int,
                           itemsize: int, basis_itemsize: int) -> int:
    """Bytes a rank needs for the ``replicated`` layout's parameter-sized state.

    Math: (slots + 1 + K)·n·itemsize (base slots, Newton momentum, V) + rows·n·basis_itemsize
    (the transient basis of a refresh, :func:`refresh_basis_rows`, in the basis dtype:
    :func:`dho2_tf.refresh.basis_dtype`).
    """
    return (num_slots + 1 + num_pairs) * n * itemsize + basis_rows * n * basis_itemsize


def choose_layout(needed_bytes: int, memory_budget: int) -> str:
    """``"replicated"`` when ``needed_bytes`` ≤ ``memory_budget``, else ``"sharded"``."""
    return "replicated" if needed_bytes <= memory_budget else "sharded"


def resolve_layout(needed_bytes: int, hp: Any, n: int, num_slots: int, log: bool,
                   basis_dtype: str) -> str:
    """``mode="auto"`` at ``build``: :func:`choose_layout` for the replicated layout's
    ``needed_bytes`` and ``hp.memory_budget``, logged when ``log`` (rank 0) with the basis
    dtype ``basis_dtype`` the refreshes will use."""
    chosen = choose_layout(needed_bytes, hp.memory_budget)
    if log:
        logger.info("DHO2 mode='auto' chose %r: replicated state %.1f MiB per rank "
                    "(n=%d, K=%d, %d base slots, curvature basis %d rows in %s) %s "
                    "memory_budget %.1f MiB", chosen, needed_bytes / 2**20, n, hp.num_pairs,
                    num_slots, refresh_basis_rows(hp), basis_dtype,
                    "<=" if chosen == "replicated" else ">", hp.memory_budget / 2**20)
    return chosen


def mode_class(mode: str) -> type[Mode]:
    """The class of ``mode``, whose class-level capabilities (``checkpointable``,
    ``all_ranks_train``, ``process_sets_for``, ``rank_groups``, ``window_rules``) hold before
    an optimizer exists; ``"auto"`` shares those of ``sharded`` and ``replicated``."""
    return MODES.get(mode, ShardedMode)


def window_rules(mode: str) -> tuple[str, ...]:
    """The ``window_rule`` values ``mode`` accepts, its default first."""
    return mode_class(mode).window_rules


def check_mode_options(mode: str, window_rule: str | None,
                       max_refresh_every: int | None) -> str:
    """Validate the mode-dependent options; returns the window rule in use (``None``: the
    mode's default).

    Raises:
        ValueError: ``mode`` not in :data:`MODE_CHOICES`; ``max_refresh_every`` (the adaptive
            schedule) with a mode without it; a ``window_rule`` the mode does not accept.
    """
    if mode not in MODE_CHOICES:
        raise ValueError(f"`mode` must be one of {MODE_CHOICES}. Received: mode={mode!r}")
    if max_refresh_every is not None and not mode_class(mode).adaptive_schedule:
        raise ValueError("`max_refresh_every` (the adaptive schedule) is not available "
                         f"with mode={mode!r}, whose curvature ranks refresh on the "
                         f"fixed schedule. Received: max_refresh_every={max_refresh_every}, "
                         f"mode={mode!r}")
    allowed = window_rules(mode)
    rule = allowed[0] if window_rule is None else window_rule
    if rule not in allowed:
        raise ValueError("`window_rule` must be 'none', or 'extrapolate' with "
                         f"mode='faithful'. Received: window_rule={window_rule!r}, "
                         f"mode={mode!r}")
    return rule


def make_mode(name: str, hp: Any) -> Mode:
    """The mode object ``name`` (a key of :data:`MODES`) for the hyper-parameters ``hp``."""
    return MODES[name](hp)


__all__ = ["MODES", "MODE_CHOICES", "Mode", "ModeContext", "StateVariable", "StepPlan",
           "check_mode_options", "choose_layout", "make_mode", "mode_class",
           "refresh_basis_rows", "replicated_state_bytes", "resolve_layout", "window_rules"]
