"""The interface a DHO2 distribution mode implements, and the sharded-state mode.

A mode decides how the parameter-sized state (base slots, Newton momentum, V) is laid out (which
ranks share the shards), which collectives one step uses, and how a curvature refresh is computed
and installed. It holds no optimizer: it works on a :class:`~dho2_tf.modes.context.ModeContext`
and returns data (a :class:`~dho2_tf.modes.context.StepPlan` for the graph step, host actions from
its eager hooks, :class:`~dho2_tf.modes.context.CurvatureCapabilities` for the refresh path). The
FOSI maths itself is :func:`dho2_tf.hybrid.hybrid_displacement` for every mode, applied by
:class:`dho2_tf.fosi_step.FosiStep`.

``sharded`` (this module): every parameter-sized vector is cut into P shards of s = ⌈n/P⌉
entries (:class:`dho2_tf.distributed.sharding.ShardLayout`). One step issues dependent
collectives: a reduce-scatter of the gradient (mean, n numbers), an allreduce of V_r G_r (K
numbers; 2K or 3K at the first step after a refresh), for Adam an allreduce of V_r u_r (K), and
an all-gather of the displacement shards (n), after which every rank adds the full displacement
to its weights: three collectives per step for sgd/momentum/nesterov, four for Adam. State per
rank: (slots + 1 + K)·n/P numbers. Choose it when the replicated state would not fit a rank's
memory; otherwise ``replicated`` (one gradient allreduce per step) is faster.
"""

from __future__ import annotations

import contextlib
from typing import Any

import tensorflow as tf

from dho2_tf.distributed.comm import Communicator, Group, LocalComm
from dho2_tf.distributed.sharding import ShardLayout
from dho2_tf.flat import FlatSpec, unflatten
from dho2_tf.modes.context import (CurvatureCapabilities, HostAction, ModeContext, RefreshIfDue,
                                   StateVariable, StepPlan)

NOT_A_CURVATURE_RANK = ("serve_curvature() runs only on the curvature ranks of mode='pipelined'; "
                        "update ranks train with fit().")


class Mode:
    """Base class: state sharded 1/P over ``group`` (all ranks unless overridden).

    Subclasses override the pieces that differ; the default step is the sharded one. A mode is
    made from the hyper-parameters alone; what it works on after ``build`` is its
    :attr:`context`. The eager hooks receive the optimizer's step count as a Python int (no
    variable reads), so a step with nothing to do costs a few comparisons.
    """

    name = ""
    #: Whether the parameter-sized state is sharded over ``group`` (else full on every rank).
    shards_state = True
    #: HVP reduction of the Lanczos run ("mean" or "root0").
    hvp_reduce = "mean"
    #: Modes whose exported state (the optimizer's ``export_state``) this mode can import.
    imports_state_of: tuple[str, ...] = ()
    #: The ``window_rule`` values this mode accepts, its default first.
    window_rules: tuple[str, ...] = ("none",)
    #: Whether the adaptive refresh schedule (``max_refresh_every``) is available.
    adaptive_schedule = True
    #: Whether every rank trains on its data shard (``pipelined``: the curvature ranks do not).
    all_ranks_train = True
    #: Whether the ranks' configurations are compared before the first step (``pipelined``:
    #: there, to match the collective its curvature ranks issue before serving).
    checks_consistency_first = False
    #: Layout of the Lanczos basis during a refresh ("sharded": 1/P of it per rank).
    lanczos_basis = "sharded"
    #: Whether refreshes after the first may be warm-started (``pipelined``: always Lanczos).
    warm_refresh = True
    #: Whether checkpoints of the training state can be written in this mode.
    checkpointable = True
    #: Whether the exported state is rank-local (cannot be re-partitioned to another world).
    state_is_rank_local = False

    @staticmethod
    def process_sets_for(curvature_ranks: int, update_ranks: int | None,
                         world_size: int | None = None) -> list[tuple[int, ...]]:
        """Process sets a run of this mode registers when Horovod starts (none)."""
        return []

    @staticmethod
    def rank_groups(world_size: int, curvature_ranks: int, update_ranks: int | None) -> Any:
        """Which ranks train and which compute curvature (``None``: every rank trains)."""
        return None

    def __init__(self, hp: Any) -> None:
        self.hp = hp
        self._context: ModeContext | None = None

    # ------------------------------------------------------------------ context
    def state_variables(self, n: int, dtype: tf.DType) -> tuple[StateVariable, ...]:
        """The variables this mode keeps besides the common state (none)."""
        return ()

    def attach(self, context: ModeContext) -> None:
        """Work on ``context`` from now on (the optimizer calls it at ``build``)."""
        self._context = context

    @property
    def context(self) -> ModeContext:
        """What the built mode works on (RuntimeError before ``build``)."""
        if self._context is None:
            raise RuntimeError(f"mode {self.name!r} has no context before the optimizer is built")
        return self._context

    @property
    def comm(self) -> Communicator:
        """The communicator of the context."""
        return self.context.comm

    @property
    def group(self) -> Group | None:
        """Ranks that share the state shards and take part in steps (``None``: all)."""
        return self.group_in(self.comm)

    def group_in(self, comm: Communicator) -> Group | None:
        """:attr:`group` for ``comm`` (before ``build``; ``None``: all ranks)."""
        return None

    def is_curvature_rank_in(self, comm: Communicator) -> bool:
        """Whether this rank of ``comm`` computes curvature instead of training."""
        return False

    @property
    def is_curvature_rank(self) -> bool:
        """:meth:`is_curvature_rank_in` the context's communicator."""
        return self.is_curvature_rank_in(self.comm)

    def layout(self, comm: Communicator, n: int) -> ShardLayout:
        """Shard of the parameter-sized state held by this rank of ``comm``."""
        if not self.shards_state:
            return ShardLayout(n, 1, 0)
        group = self.group_in(comm)
        return ShardLayout(n, comm.group_size(group), comm.group_rank(group))

    def projection(self, comm: Communicator) -> tuple[Communicator, Group | None]:
        """Communicator completing the K-vector projections (identity when V is full)."""
        return (comm, self.group_in(comm)) if self.shards_state else (LocalComm(), None)

    def can_import(self, mode: str | None) -> bool:
        """Whether a state exported by ``mode`` loads into this mode."""
        return mode == self.name or mode in self.imports_state_of

    def validate_world(self, comm: Communicator) -> None:
        """Raise ValueError before any collective when the world of ``comm`` does not fit."""

    def required_process_sets(self, world_size: int | None = None) -> list[tuple[int, ...]]:
        """Process sets the communicator must register when Horovod starts."""
        return self.process_sets_for(self.hp.curvature_ranks, self.hp.update_ranks, world_size)

    def check_import_world(self, saved_world_size: int | None) -> None:
        """Raise ValueError when a state exported by ``saved_world_size`` ranks cannot load here."""
        if self.state_is_rank_local and saved_world_size != self.comm.size:
            raise ValueError(f"{self.name} state is rank-local and cannot be re-partitioned: "
                             f"resume with {saved_world_size} ranks.")

    def broadcast_group(self, comm: Communicator) -> Group | None:
        """Ranks of ``comm`` among which the initial state is broadcast from their root."""
        return self.group_in(comm)

    # ------------------------------------------------------------------ graph-safe step
    def step_plan(self) -> StepPlan:
        """Sharded step: reduce-scatter Ḡ, FOSI on the shard, all-gather δ, θ ← θ + δ.

        Math: Ḡ_r = (1/P)·Σ_q G_q restricted to S_r; δ_r from :func:`hybrid_displacement`
        (two K-sized allreduces inside); δ = [δ_0; …; δ_{P−1}] (unpadded to n).
        """
        group = self.group
        return StepPlan("reducescatter", group, None, True, self.projection(self.comm))

    # ------------------------------------------------------------------ eager hooks
    def on_step_begin(self, iterations: int) -> tuple[HostAction, ...]:
        """Before update ``iterations`` (0-based): refresh when the schedule says so."""
        return (RefreshIfDue(),)

    def before_refresh(self, iterations: int) -> None:
        """Just before a refresh that :class:`RefreshIfDue` found due (``faithful``: the
        window jump)."""

    def on_step_end(self, iterations: int) -> tuple[HostAction, ...]:
        """After the update(s); ``iterations`` is the step count afterwards."""
        return ()

    def on_train_end(self) -> tuple[HostAction, ...]:
        """Training finished on this rank (drain pending exchanges)."""
        return ()

    def refresh_delay(self) -> int:
        """Steps from a refresh's due step until its eigenpairs are installed (0)."""
        return 0

    def check_hooks_ran(self, t: tf.Tensor) -> Any:
        """Graph-side: the assertion that fails update ``t`` of a hand-wired loop when a hook
        this mode needs (beyond ``on_step_begin``, checked by the caller) was not called
        (``None``: none)."""
        return None

    def sync_host_state(self) -> None:
        """Forget Python-side copies of variables (they may have been restored)."""

    def serve(self, estimator: Any) -> list[dict[str, Any]]:
        """The curvature ranks' loop (``pipelined`` only)."""
        raise RuntimeError(NOT_A_CURVATURE_RANK)

    # ------------------------------------------------------------------ curvature
    def lanczos_group(self, comm: Communicator) -> Group | None:
        """The ranks of ``comm`` that run the Lanczos iteration together (``None``: all)."""
        return None

    @property
    def reuses_check(self) -> bool:
        """Whether a refresh may continue from the staleness check of the same step
        (``faithful`` moves the weights between the two: its window jump)."""
        return True

    @property
    def eigenvalue_shift(self) -> float:
        """Added to λ before η is computed (ADMM: ρ)."""
        return 0.0

    def curvature_weights(self) -> Any:
        """Context in which the model holds the weights the curvature is estimated at
        (default: its own; ``admm``: the consensus z)."""
        return contextlib.nullcontext()

    def curvature_capabilities(self, comm: Communicator) -> CurvatureCapabilities:
        """How :mod:`dho2_tf.refresh` estimates and installs curvature for this mode."""
        return CurvatureCapabilities(
            estimates=self.all_ranks_train or self.is_curvature_rank_in(comm),
            hvp_reduce=self.hvp_reduce,
            lanczos_basis=self.lanczos_basis, lanczos_group=self.lanczos_group(comm),
            warm_refresh=self.warm_refresh, reuses_check=self.reuses_check,
            gathers_vectors=not self.shards_state and self.lanczos_basis != "replicated",
            eigenvalue_shift=self.eigenvalue_shift, weights=self.curvature_weights)

    # ------------------------------------------------------------------ monitoring
    def evaluation_weights(self) -> Any:
        """Context in which the model holds the weights to evaluate (default: its own)."""
        return contextlib.nullcontext()

    def metrics(self) -> dict[str, float]:
        """Mode-specific scalars for monitoring."""
        return {}


class ShardedMode(Mode):
    """``sharded``: data-parallel FOSI with all optimizer state sharded 1/P.

    Its exported state is full-length, so it also imports a ``replicated`` state.
    """

    name = "sharded"
    imports_state_of = ("replicated",)


def state_property(name: str, doc: str) -> property:
    """A read-only property of a mode: its state variable ``name`` (``context.state[name]``)."""
    return property(lambda self: self.context.state[name], doc=doc)


def assign_flat(variables: list[tf.Variable], theta: tf.Tensor, spec: FlatSpec) -> None:
    """Write the flat vector θ [n] back into the model variables (eager hooks, not steps)."""
    for var, value in zip(variables, unflatten(theta, spec)):
        var.assign(value)
