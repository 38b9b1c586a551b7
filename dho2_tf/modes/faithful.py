"""``faithful``: the released DHO2 code's design, kept so users can compare against it.

Reference §5.1: the HVP of rank 0's static batch (every rank computes one, rank 0's is adopted),
the Lanczos basis sharded, the full V gathered on every rank, replicated optimizer state, a full
gradient allreduce per step, and the "ADMM-like" window rule (:func:`window_jump`) at the end of
every refresh window (one window = ``refresh_every`` steps, aligned with the refreshes).
"""

from __future__ import annotations

import tensorflow as tf

from dho2_tf.distributed.admm import window_jump
from dho2_tf.flat import flatten
from dho2_tf.modes.base import Mode, assign_flat


class FaithfulMode(Mode):
    """Replicated state, root-0 HVPs, window extrapolation with gradient offset σ_w·v."""

    name = "faithful"
    shards_state = False
    hvp_reduce = "root0"

    def build(self, var_list: list[tf.Variable]) -> None:
        n, dtype = self.opt.spec.n, var_list[0].dtype
        self.velocity = self.opt.add_variable([n], dtype, name="window_velocity")
        self.window_start = self.opt.add_variable([n], dtype, name="window_start")
        self.jumps = self.opt.add_variable([], tf.int64, name="window_jumps")

    @property
    def uses_window(self) -> bool:
        return self.opt.window_rule == "extrapolate"

    def step(self, grads: list[tf.Tensor], variables: list[tf.Variable]) -> None:
        """G = allreduce_mean(g) + σ_w·v; θ ← θ + c·u − α·d with the full V (reference §5.1)."""
        opt = self.opt
        g = self.comm.allreduce(flatten(grads, opt.spec, variables[0].dtype), "mean",
                                name="dho2/gradient")
        if self.uses_window:
            g = g + tf.cast(opt.window_sigma, g.dtype) * self.velocity
        theta = flatten(variables) + opt.fosi_displacement(g)
        assign_flat(variables, theta, opt)

    def on_step_begin(self) -> None:
        """At a window boundary: jump (from the second window on), refresh, then θ̃ ← θ."""
        opt = self.opt
        if not opt.refresh_due():
            return
        variables = opt.model_variables
        if self.uses_window and int(opt.refresh_index()) > 0:
            theta, velocity = window_jump(flatten(variables), self.window_start.value(),
                                          self.velocity.value())
            self.velocity.assign(velocity)
            assign_flat(variables, theta, opt)
            self.jumps.assign_add(1)
        opt.refresh_curvature()
        self.window_start.assign(flatten(variables))

    def metrics(self) -> dict[str, float]:
        return {"window_jumps": float(self.jumps.numpy()),
                "window_velocity_norm": float(tf.norm(self.velocity).numpy())}
