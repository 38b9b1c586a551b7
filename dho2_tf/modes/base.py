"""The interface a DHO2 distribution mode implements, and the shared sharded-state mode.

A mode decides how the parameter-sized state is laid out (which ranks share the shards), which
collectives one step uses, and how a curvature refresh is computed and installed. The FOSI maths
itself is :func:`dho2_tf.hybrid.hybrid_displacement` for every mode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import tensorflow as tf

from dho2_tf.distributed.comm import Communicator, Group, LocalComm
from dho2_tf.distributed.sharding import ShardLayout
from dho2_tf.flat import flatten, unflatten

if TYPE_CHECKING:
    from dho2_tf.optimizer import DHO2


class Mode:
    """Base class: state sharded 1/P over ``self.group`` (all ranks unless overridden).

    Subclasses override the pieces that differ; see :class:`ShardedMode` for the default step.
    """

    name = ""
    #: Whether the parameter-sized state is sharded over ``group`` (else full on every rank).
    shards_state = True
    #: HVP reduction of the Lanczos run ("mean" or "root0").
    hvp_reduce = "mean"

    def __init__(self, opt: "DHO2") -> None:
        self.opt = opt

    @property
    def comm(self) -> Communicator:
        """The optimizer's communicator."""
        return self.opt.comm

    @property
    def group(self) -> Group | None:
        """Ranks that share the state shards and take part in steps (``None``: all)."""
        return None

    def layout(self, n: int) -> ShardLayout:
        """Shard of the parameter-sized state held by this rank."""
        if not self.shards_state:
            return ShardLayout(n, 1, 0)
        return ShardLayout(n, self.comm.group_size(self.group), self.comm.group_rank(self.group))

    def projection_comm(self) -> tuple[Communicator, Group | None]:
        """Communicator completing the K-vector projections (identity when V is full)."""
        return (self.comm, self.group) if self.shards_state else (LocalComm(), None)

    def build(self, var_list: list[tf.Variable]) -> None:
        """Create mode-specific variables (after the common ones)."""

    def validate_world(self) -> None:
        """Raise ValueError before any collective when the world does not fit the mode."""

    # ------------------------------------------------------------------ graph-safe step
    def step(self, grads: list[tf.Tensor], variables: list[tf.Variable]) -> None:
        """Sharded step: reduce-scatter Ḡ, FOSI on the shard, all-gather θ (reference §5.2)."""
        opt, layout, comm, group = self.opt, self.opt.layout, self.comm, self.group
        g_flat = flatten(grads, opt.spec, variables[0].dtype)
        g_r = comm.reducescatter(layout.pad(g_flat), "mean", name="dho2/gradient",
                                 process_set=group)
        theta_r = layout.local(flatten(variables))
        delta_r = opt.fosi_displacement(g_r)
        theta = layout.unpad(comm.allgather(theta_r + delta_r, name="dho2/theta",
                                            process_set=group))
        assign_flat(variables, theta, opt)

    # ------------------------------------------------------------------ eager hooks
    def on_step_begin(self) -> None:
        """Before update t: refresh when the schedule says so."""
        if self.opt.refresh_due():
            self.opt.refresh_curvature()

    def on_step_end(self) -> None:
        """After update t (eager)."""

    def on_train_end(self) -> None:
        """Training finished on this rank (drain pending exchanges)."""

    def estimate(self) -> Any:
        """Lanczos + Ritz pairs at the current weights (every rank of the world calls it)."""
        from dho2_tf.curvature.spectrum import estimate_spectrum

        opt = self.opt
        index = int(opt.refresh_index())
        return estimate_spectrum(opt.binding["hvp"], opt.spec.n, opt.k, opt.ell, self.comm,
                                 m=opt.lanczos_order, seed=opt.seed + index,
                                 hvp_dtype=opt.binding["dtype"], hvp_reduce=self.hvp_reduce)

    def vectors_for_state(self, vectors_r: tf.Tensor) -> tf.Tensor:
        """Convert the Lanczos shard of V into this mode's layout (full V when not sharded)."""
        if self.shards_state:
            return vectors_r
        from dho2_tf.curvature.spectrum import gather_vectors

        return gather_vectors(vectors_r, self.opt.spec.n, self.comm)

    def eigenvalue_shift(self) -> float:
        """Added to λ before η is computed (ADMM: ρ)."""
        return 0.0

    def metrics(self) -> dict[str, float]:
        """Mode-specific scalars for monitoring."""
        return {}

    def broadcast_group(self) -> Group | None:
        """Ranks among which the initial state is broadcast from their root."""
        return self.group


class ShardedMode(Mode):
    """``sharded`` (default): data-parallel FOSI with all optimizer state sharded 1/P."""

    name = "sharded"


def assign_flat(variables: list[tf.Variable], theta: tf.Tensor, opt: "DHO2") -> None:
    """Write the flat vector θ [n] back into the model variables."""
    for var, value in zip(variables, unflatten(theta, opt.spec)):
        var.assign(value)
