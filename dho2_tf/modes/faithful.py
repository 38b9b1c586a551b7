"""``faithful``: the released DHO2 code's design, kept so users can compare against it.

Gu et al., "DHO2" (arXiv 2505.00982), as released: the HVP of rank 0's static batch (every rank
computes one, rank 0's is adopted), the Lanczos basis sharded, the full V gathered on every rank,
replicated optimizer state, a full gradient allreduce per step (the step of
:class:`~dho2_tf.modes.replicated.ReplicatedMode`), and the "ADMM-like" window rule
(:func:`window_jump`) at the end of every refresh window (one window = ``refresh_every`` steps,
aligned with the refreshes).
"""

from __future__ import annotations

import tensorflow as tf

from dho2_tf.distributed.outer_rules import window_jump
from dho2_tf.flat import flatten
from dho2_tf.modes.base import assign_flat
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

    def build(self, var_list: list[tf.Variable]) -> None:
        n, dtype = self.opt.spec.n, var_list[0].dtype
        self.velocity = self.opt.add_variable([n], dtype, name="window_velocity")
        self.window_start = self.opt.add_variable([n], dtype, name="window_start")
        self.jumps = self.opt.add_variable([], tf.int64, name="window_jumps")

    @property
    def uses_window(self) -> bool:
        return self.opt.window_rule == "extrapolate"

    @property
    def reuses_check(self) -> bool:
        """The window jump moves the weights after the staleness check: refresh afresh."""
        return not self.uses_window

    def adjust_gradient(self, g: tf.Tensor) -> tf.Tensor:
        """G = allreduce_mean(g) + σ_w·v (the window's gradient offset)."""
        if self.uses_window:
            return g + scalar(self.opt.window_sigma, g.dtype) * self.velocity
        return g

    def on_step_begin(self, iterations: int) -> None:
        """At a window boundary: jump (from the second window on), refresh, then θ̃ ← θ."""
        opt = self.opt
        if not opt.curvature.due(iterations):
            return
        variables = opt.model_variables
        if self.uses_window and int(opt.curvature.index()) > 0:
            theta, velocity = window_jump(flatten(variables), self.window_start.value(),
                                          self.velocity.value())
            self.velocity.assign(velocity)
            assign_flat(variables, theta, opt)
            self.jumps.assign_add(1)
        opt.curvature.refresh()
        self.window_start.assign(flatten(variables))

    def metrics(self) -> dict[str, float]:
        return {"window_jumps": float(self.jumps.numpy()),
                "window_velocity_norm": float(tf.norm(self.velocity).numpy())}
