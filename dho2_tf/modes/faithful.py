"""``faithful``: the released DHO2 code's design, kept so users can compare against it.

Gu et al., "DHO2" (arXiv 2505.00982), as released: the HVP of rank 0's static batch (every rank
computes one, rank 0's is adopted), the Lanczos basis sharded, the full V gathered on every rank,
replicated optimizer state, a full gradient allreduce per step (the step of
:class:`~dho2_tf.modes.replicated.ReplicatedMode`), and the "ADMM-like" window rule
(:func:`window_jump`) at the end of every refresh window (one window = ``refresh_every`` steps,
aligned with the refreshes).
"""

from __future__ import annotations

from typing import Callable

import tensorflow as tf

from dho2_tf.distributed.outer_rules import window_jump
from dho2_tf.flat import flatten
from dho2_tf.modes.base import assign_flat, state_property
from dho2_tf.modes.context import StateVariable
from dho2_tf.modes.replicated import ReplicatedMode
from dho2_tf.numerics import scalar


class FaithfulMode(ReplicatedMode):
    """Replicated state, root-0 HVPs, window extrapolation with gradient offset σ_w·v."""

    name = "faithful"
    hvp_reduce = "root0"
    #: The released code keeps the basis sharded (1/P of the m·n basis per rank).
    lanczos_basis = "sharded"
    imports_state_of = ()
    window_rules = ("extrapolate", "none")

    def state_variables(self, n: int, dtype: tf.DType) -> tuple[StateVariable, ...]:
        """The window's velocity v and start θ̃ (n each), and the number of jumps."""
        return (StateVariable("window_velocity", (n,), dtype),
                StateVariable("window_start", (n,), dtype),
                StateVariable("window_jumps", (), tf.int64))

    velocity = state_property("window_velocity", "v, the window's velocity (the sum of the "
                              "previous windows' displacements).")
    window_start = state_property("window_start", "θ̃, the weights at the start of the window.")
    jumps = state_property("window_jumps", "The number of window jumps so far.")

    @property
    def uses_window(self) -> bool:
        return self.hp.window_rule == "extrapolate"

    @property
    def reuses_check(self) -> bool:
        """The window jump moves the weights after the staleness check: refresh afresh."""
        return not self.uses_window

    def gradient_adjustment(self) -> Callable[[tf.Tensor, list[tf.Variable]], tf.Tensor] | None:
        """G = allreduce_mean(g) + σ_w·v (the window's gradient offset)."""
        if not self.uses_window:
            return None
        sigma, velocity = self.hp.window_sigma, self.velocity

        def adjust(g: tf.Tensor, weights: list[tf.Variable]) -> tf.Tensor:
            return g + scalar(sigma, g.dtype) * velocity

        return adjust

    def before_refresh(self, iterations: int) -> None:
        """At a window boundary: jump (from the second window on), then θ̃ ← θ (the refresh
        that follows leaves the weights as they are)."""
        ctx = self.context
        if self.uses_window and int(ctx.refreshes.numpy()) > 0:
            theta, velocity = window_jump(flatten(ctx.weights), self.window_start.value(),
                                          self.velocity.value())
            self.velocity.assign(velocity)
            assign_flat(ctx.weights, theta, ctx.spec)
            self.jumps.assign_add(1)
        self.window_start.assign(flatten(ctx.weights))

    def metrics(self) -> dict[str, float]:
        return {"window_jumps": float(self.jumps.numpy()),
                "window_velocity_norm": float(tf.norm(self.velocity).numpy())}
