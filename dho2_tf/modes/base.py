"""The interface a DHO2 distribution mode implements, and the sharded-state mode.

A mode decides how the parameter-sized state (base slots, Newton momentum, V) is laid out (which
ranks share the shards), which collectives one step uses, and how a curvature refresh is computed
and installed. The FOSI maths itself is :func:`dho2_tf.hybrid.hybrid_displacement` for every
mode, applied by :meth:`dho2_tf.DHO2.apply_fosi_step`.

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
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf

from dho2_tf.distributed.comm import Communicator, Group, LocalComm
from dho2_tf.distributed.sharding import ShardLayout
from dho2_tf.flat import flatten, unflatten

if TYPE_CHECKING:
    from dho2_tf.optimizer import DHO2


class Mode:
    """Base class: state sharded 1/P over ``self.group`` (all ranks unless overridden).

    Subclasses override the pieces that differ; the default step is the sharded one.
    The eager hooks receive the optimizer's step count as a Python int (no variable reads), so a
    step with nothing to do costs a few comparisons.
    """

    name = ""
    #: Whether the parameter-sized state is sharded over ``group`` (else full on every rank).
    shards_state = True
    #: HVP reduction of the Lanczos run ("mean" or "root0").
    hvp_reduce = "mean"
    #: Modes whose exported state (:meth:`DHO2.export_state`) this mode can import.
    imports_state_of: tuple[str, ...] = ()
    #: The ``window_rule`` values this mode accepts, its default first.
    window_rules: tuple[str, ...] = ("none",)
    #: Whether the adaptive refresh schedule (``max_refresh_every``) is available.
    adaptive_schedule = True
    #: Whether this rank computes curvature instead of training (pipelined curvature ranks).
    is_curvature_rank = False
    #: Whether every rank trains on its data shard (``pipelined``: the curvature ranks do not).
    all_ranks_train = True

    @staticmethod
    def process_sets_for(curvature_ranks: int, update_ranks: int | None,
                         world_size: int | None = None) -> list[tuple[int, ...]]:
        """Process sets a run of this mode registers when Horovod starts (none)."""
        return []

    @staticmethod
    def rank_groups(world_size: int, curvature_ranks: int, update_ranks: int | None) -> Any:
        """Which ranks train and which compute curvature (``None``: every rank trains)."""
        return None

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

    def can_import(self, mode: str | None) -> bool:
        """Whether a state exported by ``mode`` loads into this mode."""
        return mode == self.name or mode in self.imports_state_of

    def build(self, var_list: list[tf.Variable]) -> None:
        """Create mode-specific variables (after the common ones)."""

    def validate_world(self) -> None:
        """Raise ValueError before any collective when the world does not fit the mode."""

    def required_process_sets(self, world_size: int | None = None) -> list[tuple[int, ...]]:
        """Process sets this optimizer's communicator must register when Horovod starts."""
        return self.process_sets_for(self.opt.curvature_ranks, self.opt.update_ranks,
                                     world_size)

    # ------------------------------------------------------------------ graph-safe step
    def step(self, grads: list[tf.Tensor], variables: list[tf.Variable]) -> None:
        """Sharded step: reduce-scatter Ḡ, FOSI on the shard, all-gather δ, θ ← θ + δ.

        Math: Ḡ_r = (1/P)·Σ_q G_q restricted to S_r; δ_r from :func:`hybrid_displacement`
        (two K-sized allreduces inside); δ = [δ_0; …; δ_{P−1}] (unpadded to n).
        """
        opt, layout, comm, group = self.opt, self.opt.layout, self.comm, self.group
        g_flat = flatten(grads, opt.spec, variables[0].dtype)
        g_r = comm.reducescatter(layout.pad(g_flat), "mean", name="dho2/gradient",
                                 process_set=group)

        def gather(delta_r: tf.Tensor) -> tf.Tensor:
            return layout.unpad(comm.allgather(delta_r, name="dho2/delta", process_set=group))

        opt.apply_fosi_step(g_r, variables, gather=gather)

    # ------------------------------------------------------------------ eager hooks
    def on_step_begin(self, iterations: int) -> None:
        """Before update ``iterations`` (0-based): refresh when the schedule says so."""
        if self.opt.curvature.due(iterations):
            self.opt.curvature.refresh()

    def on_step_end(self, iterations: int) -> None:
        """After the update(s); ``iterations`` is the step count afterwards."""

    def on_train_end(self) -> None:
        """Training finished on this rank (drain pending exchanges)."""

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

    def serve(self) -> list[dict[str, Any]]:
        """The curvature ranks' loop (``pipelined`` only)."""
        raise RuntimeError("serve_curvature() runs only on the curvature ranks of "
                           "mode='pipelined'; update ranks train with fit().")

    #: Layout of the Lanczos basis during a refresh ("sharded": 1/P of it per rank).
    lanczos_basis = "sharded"

    def lanczos_group(self) -> Group | None:
        """The ranks that run the Lanczos iteration together (``None``: all ranks)."""
        return None

    #: Whether a refresh may continue from the staleness check of the same step (``faithful``
    #: moves the weights between the two: its window jump).
    reuses_check = True
    #: Whether refreshes after the first may be warm-started (``pipelined``: always Lanczos).
    warm_refresh = True

    def make_estimator(self, hvp: Any, dtype: tf.DType, basis_dtype: str) -> Any:
        """The compiled :class:`~dho2_tf.curvature.warm_start.CurvatureEstimator` of this rank
        (``None`` on a rank that never estimates): Lanczos, plus the warm block program when
        ``refresh_method="warm"`` or the schedule is adaptive (its staleness check)."""
        from dho2_tf.curvature.spectrum import SpectrumEstimator
        from dho2_tf.curvature.warm_start import BlockRitzProgram, CurvatureEstimator

        opt, hp = self.opt, self.opt.hp
        common = dict(process_set=self.lanczos_group(), hvp_dtype=dtype, basis_dtype=basis_dtype,
                      basis_layout=self.lanczos_basis, hvp_reduce=self.hvp_reduce)
        lanczos = SpectrumEstimator(hvp, opt.spec.n, opt.k, opt.ell, self.comm,
                                    m=opt.lanczos_order, **common)
        block = None
        if self.warm_refresh and (hp.refresh_method == "warm"
                                  or hp.max_refresh_every is not None):
            block = BlockRitzProgram(hvp, opt.spec.n, opt.k, opt.ell, self.comm,
                                     extra=hp.warm_extra, batching=hp.block_hvp,
                                     name="dho2/warm", **common)
        return CurvatureEstimator(lanczos, block)

    def curvature_weights(self) -> Any:
        """Context in which the model holds the weights the curvature is estimated at
        (default: its own; ``admm``: the consensus z)."""
        return contextlib.nullcontext()

    def installed_pairs(self) -> Any:
        """The installed eigenpairs as a :class:`~dho2_tf.curvature.warm_start.WarmStart` in
        the estimator's basis layout, or ``None`` when no pair is valid (before the first
        refresh). Reads only replicated values to decide, so every rank agrees."""
        from dho2_tf.curvature.warm_start import WarmStart

        st = self.opt.state
        valid = np.diag(st.gram.numpy()) > 0.5
        if not valid.any():
            return None
        rows = st.eigenvectors.value()
        estimator = self.opt.curvature.binding["estimator"]
        if not self.shards_state and estimator.basis_layout == "sharded":
            rows = tf.transpose(estimator.layout.local(tf.transpose(rows)))  # its columns
        return WarmStart(rows, valid, st.eigenvalues.numpy().astype(np.float64),
                         self.opt.curvature.schedule.installed_residual)

    def check_staleness(self) -> Any:
        """The staleness check of the installed eigenpairs at the current weights (one block
        HVP; every rank of the world calls it), or ``None`` before the first refresh."""
        curvature = self.opt.curvature
        start = self.installed_pairs()
        if start is None:
            return None
        with self.curvature_weights():
            return curvature.binding["estimator"].check(start,
                                                        seed=self.opt.seed + curvature.index())

    def estimate(self, check: Any = None) -> Any:
        """The extreme eigenpairs at the current weights (every rank of the world calls it):
        Lanczos for the first refresh or with ``refresh_method="lanczos"``, else the warm
        block refresh from the installed eigenvectors (continuing ``check`` when given).

        First folds the Newton momentum out of the basis of the current V
        (:meth:`dho2_tf.refresh.Curvature.materialize_momentum`), since the refresh may replace V.
        """
        curvature = self.opt.curvature
        curvature.materialize_momentum()
        warm = self.warm_refresh and self.opt.hp.refresh_method == "warm"
        with self.curvature_weights():
            return curvature.binding["estimator"].estimate(
                seed=self.opt.seed + curvature.index(),
                start=self.installed_pairs() if warm else None, check=check if warm else None)

    def vectors_for_state(self, vectors_r: tf.Tensor) -> tf.Tensor:
        """Convert the Lanczos shard of V into this mode's layout (full V when not sharded)."""
        if self.shards_state or self.lanczos_basis == "replicated":
            return vectors_r
        from dho2_tf.curvature.spectrum import gather_vectors

        return gather_vectors(vectors_r, self.opt.spec.n, self.comm)

    def eigenvalue_shift(self) -> float:
        """Added to λ before η is computed (ADMM: ρ)."""
        return 0.0

    def metrics(self) -> dict[str, float]:
        """Mode-specific scalars for monitoring."""
        return {}

    #: Whether checkpoints of the training state can be written in this mode.
    checkpointable = True
    #: Whether the exported state is rank-local (cannot be re-partitioned to another world).
    state_is_rank_local = False

    def check_import_world(self, saved_world_size: int | None) -> None:
        """Raise ValueError when a state exported by ``saved_world_size`` ranks cannot load here."""
        if self.state_is_rank_local and saved_world_size != self.comm.size:
            raise ValueError(f"{self.name} state is rank-local and cannot be re-partitioned: "
                             f"resume with {saved_world_size} ranks.")

    def evaluation_weights(self) -> Any:
        """Context in which the model holds the weights to evaluate (default: its own)."""
        return contextlib.nullcontext()

    def broadcast_group(self) -> Group | None:
        """Ranks among which the initial state is broadcast from their root."""
        return self.group


class ShardedMode(Mode):
    """``sharded``: data-parallel FOSI with all optimizer state sharded 1/P.

    Its exported state is full-length, so it also imports a ``replicated`` state.
    """

    name = "sharded"
    imports_state_of = ("replicated",)


def assign_flat(variables: list[tf.Variable], theta: tf.Tensor, opt: "DHO2") -> None:
    """Write the flat vector θ [n] back into the model variables (eager hooks, not steps)."""
    for var, value in zip(variables, unflatten(theta, opt.spec)):
        var.assign(value)
