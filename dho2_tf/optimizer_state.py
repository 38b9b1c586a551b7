"""DHO2's state: the checkpointed variables, named as the update equations name them, and the
step buffers and host-side copies kept beside them.

Only :class:`OptimizerState` is optimizer state (in ``variables``, checkpointed); the others are
not checkpointed, not in ``variables`` and are rebuilt or re-read after a restore.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import tensorflow as tf

from dho2_tf import hybrid
from dho2_tf.base_rules import BaseRule
from dho2_tf.numerics import scalar

#: Shard length from which Adam updates its slots in place with TF's fused kernel (one pass
#: instead of eleven element-wise ones; the kernel's fixed cost makes it slower below). The
#: linear rules (sgd, momentum, nesterov) always step in place (:meth:`BaseRule.
#: apply_linear_in_place`).
IN_PLACE_MIN_SIZE = 1 << 16


@dataclasses.dataclass
class OptimizerState:
    """The optimizer variables of one rank (s = this rank's shard length, K = k + ℓ).

    The Newton momentum is kept as m = Vᵀc + d·m₀ and a heavy-ball buffer as B − Vᵀq, so a step
    between refreshes touches V only through K-vectors (see :mod:`dho2_tf.hybrid`).

    Attributes:
        base_slots: the base rule's slots, [s] each (heavy ball: B; Adam: m, v).
        newton_momentum: m₀ [s].
        newton_coeffs: c [K].
        newton_decay: d [].
        base_coeffs: q [K] for ``momentum``/``nesterov`` (``None`` otherwise).
        eigenvalues: λ [K].
        eigenvectors: V [K, s] (this rank's columns).
        gram: Γ = V Vᵀ [K, K] (its diagonal marks the valid rows).
        rates: η [K], η_j = |1/(λ_j + σ_d)| on valid rows.
        scale: c [], the base learning-rate scale.
        refreshes: int64, refreshes done (installed or not).
        skipped: int64, steps skipped because they were not finite.
        guard_average: μ [], running average of ‖Ḡ‖² (:mod:`dho2_tf.guard`).
        guard_reference: r [], μ at the last refresh.
        guard_level: int64, the guard's response level (0: plain FOSI) until the next refresh.
        guard_window: int64, the refresh count ``guard_reference`` belongs to.
        guard_trips: int64, times the guard level rose (a refresh schedule may read it).
        in_place: whether the base rule updates ``base_slots`` with TF's fused kernel.
    """

    base_slots: list[tf.Variable]
    newton_momentum: tf.Variable
    newton_coeffs: tf.Variable
    newton_decay: tf.Variable
    base_coeffs: tf.Variable | None
    eigenvalues: tf.Variable
    eigenvectors: tf.Variable
    gram: tf.Variable
    rates: tf.Variable
    scale: tf.Variable
    refreshes: tf.Variable
    skipped: tf.Variable
    guard_average: tf.Variable
    guard_reference: tf.Variable
    guard_level: tf.Variable
    guard_window: tf.Variable
    guard_trips: tf.Variable
    in_place: bool

    @classmethod
    def create(cls, add_variable: Callable[..., tf.Variable], rule: BaseRule, num_pairs: int,
               shard_size: int, dtype: tf.DType) -> "OptimizerState":
        """Create the variables with ``add_variable`` (Keras' ``Optimizer.add_variable``)."""
        s, kk = shard_size, num_pairs
        return cls(
            base_slots=[add_variable([s], dtype, name=f"base_{n}") for n in rule.slot_names],
            newton_momentum=add_variable([s], dtype, name="newton_momentum"),
            newton_coeffs=add_variable([kk], dtype, name="newton_coeffs"),
            newton_decay=add_variable([], dtype, initializer="ones", name="newton_decay"),
            base_coeffs=add_variable([kk], dtype, name="base_coeffs")
            if rule.linear_buffer else None,
            eigenvalues=add_variable([kk], dtype, name="eigenvalues"),
            eigenvectors=add_variable([kk, s], dtype, name="eigenvectors_shard"),
            gram=add_variable([kk, kk], dtype, name="gram"),
            rates=add_variable([kk], dtype, name="newton_rates"),
            scale=add_variable([], dtype, initializer="ones", name="lr_scale"),
            refreshes=add_variable([], tf.int64, name="num_refreshes"),
            skipped=add_variable([], tf.int64, name="skipped_steps"),
            guard_average=add_variable([], dtype, name="guard_average"),
            guard_reference=add_variable([], dtype, name="guard_reference"),
            guard_level=add_variable([], tf.int64, name="guard_level"),
            guard_window=add_variable([], tf.int64, name="guard_window"),
            guard_trips=add_variable([], tf.int64, name="guard_trips"),
            in_place=rule.updates_in_place and (rule.linear or s >= IN_PLACE_MIN_SIZE))

    @property
    def parameter_sized(self) -> list[tf.Variable]:
        """The variables with one entry (or column) per parameter: slots, m₀ and V."""
        return [*self.base_slots, self.newton_momentum, self.eigenvectors]

    def coordinate_defaults(self) -> dict[str, tf.Tensor]:
        """Values of c, d and q (m and B themselves) and of the guard's variables (no trip yet)
        for states exported before they existed."""
        out = {self.newton_coeffs.name: tf.zeros_like(self.newton_coeffs),
               self.newton_decay.name: tf.ones_like(self.newton_decay)}
        for var in (self.guard_average, self.guard_reference, self.guard_level,
                    self.guard_window, self.guard_trips):
            out[var.name] = tf.zeros_like(var)
        if self.base_coeffs is not None:
            out[self.base_coeffs.name] = tf.zeros_like(self.base_coeffs)
        return out

    def materialize_momentum(self) -> None:
        """Fold the K coordinates into the vectors: m₀ ← Vᵀc + d·m₀, c ← 0, d ← 1, and for
        ``momentum``/``nesterov`` B ← B − Vᵀq, q ← 0 (the same state, free of the current V).

        Eager and local (c and q are replicated, so no collective); runs before every change
        of V. Exported states keep the coordinates as they are (with V), so a resumed run
        continues bit for bit.
        """
        v = self.eigenvectors
        self.newton_momentum.assign(hybrid.materialize(
            self.newton_momentum, self.newton_coeffs, v, self.newton_decay))
        self.newton_coeffs.assign(tf.zeros_like(self.newton_coeffs))
        self.newton_decay.assign(tf.ones_like(self.newton_decay))
        if self.base_coeffs is not None:
            buffer = self.base_slots[0]
            buffer.assign(hybrid.materialize(buffer, -self.base_coeffs, v))
            self.base_coeffs.assign(tf.zeros_like(self.base_coeffs))

    def install(self, eigenvalues: tf.Tensor, vectors: tf.Tensor, gram: tf.Tensor,
                shift: float, damping: float, ell: int, c_max: float) -> None:
        """λ, V, Γ ← the estimate; η, c from :func:`dho2_tf.hybrid.newton_rates` on λ + shift.

        Math: η_j = |1/(λ_j + shift + σ_d)| on the valid rows (Γ_jj > ½, else 0), and
        c = clip(η_ℓ/η_{K−1}, 1, c_max) (the largest over the k-th largest curvature).
        """
        dtype = self.eigenvalues.dtype
        eigenvalues = tf.cast(eigenvalues, dtype)
        gram = tf.cast(gram, dtype)
        valid = tf.linalg.diag_part(gram) > 0.5
        rates, scale = hybrid.newton_rates(eigenvalues + scalar(shift, dtype), valid, damping,
                                           ell, c_max)
        self.eigenvalues.assign(eigenvalues)
        self.eigenvectors.assign(tf.cast(vectors, dtype))
        self.gram.assign(gram)
        self.rates.assign(rates)
        self.scale.assign(scale)


class Workspace:
    """Step buffers that are not optimizer state (not checkpointed, not in ``variables``).

    Attributes:
        projected: float [K·(1 + buffered)], [V m₀ ; V B] cached by the last applied step.
        projected_at: int64, the refresh count for which ``projected`` is valid (−1: none).
        base_out: float [s], output of an in-place base step (``None`` if the rule has none).
        consecutive_skips: int64, skipped steps since the last applied one.
        source_checked: bool, whether a step traced with no curvature source already ran the
            missing-source check (:meth:`dho2_tf.step_hooks.StepHooks.check_source`).
    """

    def __init__(self, rule: BaseRule, num_pairs: int, shard_size: int, dtype: tf.DType,
                 in_place: bool) -> None:
        size = num_pairs * (2 if rule.linear_buffer else 1)
        self.projected = tf.Variable(tf.zeros([size], dtype), trainable=False,
                                     name="dho2_projected_state")
        self.projected_at = tf.Variable(tf.constant(-1, tf.int64), trainable=False,
                                        name="dho2_projected_at")
        self.base_out = tf.Variable(tf.zeros([shard_size], dtype), trainable=False,
                                    name="dho2_base_step") if in_place else None
        self.consecutive_skips = tf.Variable(tf.constant(0, tf.int64), trainable=False,
                                             name="dho2_consecutive_skips")
        self.source_checked = tf.Variable(False, trainable=False, name="dho2_source_checked")


class StatShadows:
    """Copies of the bound model's non-trainable variables (batch-norm statistics), so a skipped
    step can restore them inside the step graph. A plain object: not tracked by checkpoints."""

    def __init__(self, model: tf.keras.Model) -> None:
        self.model = model
        self.pairs = [(var, tf.Variable(var.value(), trainable=False,
                                        name=f"dho2_shadow_{i}"))
                      for i, var in enumerate(model.non_trainable_variables)]

    def sync(self) -> None:
        """shadow ← statistic (eager), after the statistics were changed outside a step."""
        for var, shadow in self.pairs:
            shadow.assign(var.value())
