"""Step buffers and host-side copies DHO2 keeps beside its Keras optimizer variables.

None of them is optimizer state: they are not checkpointed, not in ``variables`` and are
rebuilt or re-read after a restore.
"""

from __future__ import annotations

import tensorflow as tf

from dho2_tf.base_rules import BaseRule


class Workspace:
    """Step buffers that are not optimizer state (not checkpointed, not in ``variables``).

    Attributes:
        projected: float [K·(1 + buffered)], [V m₀ ; V B] cached by the last applied step.
        projected_at: int64, the refresh count for which ``projected`` is valid (−1: none).
        base_out: float [s], output of an in-place base step (``None`` if the rule has none).
        consecutive_skips: int64, skipped steps since the last applied one.
        source_checked: bool, whether a step traced with no curvature source already ran the
            missing-source check (:meth:`dho2_tf.optimizer.DHO2._check_curvature_source`).
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


class HostState:
    """Python copies the eager hooks keep between steps (a plain object: setting attributes on
    the optimizer itself goes through Keras' tracking, which costs microseconds per step).

    Attributes:
        refreshes: the refresh counter, or ``None`` when it must be re-read.
        begun_at: the step count :meth:`dho2_tf.optimizer.DHO2.on_step_begin` saw, until :meth:`dho2_tf.optimizer.DHO2.on_step_end`.
        skipped_reported: skipped steps already reported in the log.
        source_warned: whether the missing-curvature-source warning was given.
    """

    def __init__(self) -> None:
        self.refreshes: int | None = None
        self.begun_at: int | None = None
        self.skipped_reported = 0
        self.source_warned = False


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
