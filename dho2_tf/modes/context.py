"""What a distribution mode works on, and what it hands back: plain data, no optimizer.

The optimizer builds a :class:`ModeContext` at ``build`` (communicator, hyper-parameters, the
flat layout of the weights, the mode's own state variables) and gives it to the mode. The mode
answers with data: a :class:`StepPlan` says how one graph step reduces the gradient, adjusts it,
gathers δ and completes the K-vector projections; its eager hooks return host actions
(:class:`RefreshIfDue`, :class:`InstallPairs`, ...) that :mod:`dho2_tf.step_hooks` carries out;
:class:`CurvatureCapabilities` says how the refresh path (:mod:`dho2_tf.refresh`) estimates
curvature for it. A mode never calls back into the optimizer.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Union

import tensorflow as tf

from dho2_tf.distributed.comm import Communicator, Group
from dho2_tf.distributed.sharding import ShardLayout
from dho2_tf.flat import FlatSpec


class StateVariable(NamedTuple):
    """A variable the mode keeps (created by the optimizer with ``add_variable``, after its
    common state): ``name``, ``shape`` and ``dtype``."""

    name: str
    shape: tuple[int, ...]
    dtype: tf.DType


class ModeContext(NamedTuple):
    """The data a built mode works on.

    Attributes:
        comm: the communicator.
        hp: the hyper-parameters (:class:`dho2_tf.hyperparameters.Hyperparameters`).
        spec: the flat layout of the model weights (n entries).
        layout: this rank's shard of the parameter-sized state.
        weights: the model variables, in the flat order.
        state: the mode's own variables by name (its :meth:`Mode.state_variables`).
        refreshes: the refresh counter (number of refreshes done so far).
    """

    comm: Communicator
    hp: Any
    spec: FlatSpec
    layout: ShardLayout
    weights: list[tf.Variable]
    state: dict[str, tf.Variable]
    refreshes: tf.Variable


class StepPlan(NamedTuple):
    """How one graph step is distributed, as the optimizer executes it.

    Math: G = adjust(R(flatten(g)), θ), with R the rank reduction (``"allreduce"``: the mean
    over all ranks, collective ``dho2/gradient``; ``"reducescatter"``: this rank's shard of the
    mean over ``group``, the padded vector cut by the layout; ``"none"``: the local gradient);
    δ_r from the FOSI step with the K-vector projections completed over ``projection``; δ =
    unpad(allgather(δ_r)) over ``group`` (collective ``dho2/delta``) when ``gather``, else δ_r.

    Attributes:
        reduce: ``"allreduce"``, ``"reducescatter"`` or ``"none"``.
        group: the ranks of the reduction and the gather (``None``: all).
        adjust: ``(G, weights) → G'``, a pure function of tensors (``None``: G unchanged).
        gather: whether δ_r is a shard to all-gather.
        projection: communicator and group completing the K-vector projections.
    """

    reduce: str
    group: Group | None
    adjust: Callable[[tf.Tensor, list[tf.Variable]], tf.Tensor] | None
    gather: bool
    projection: tuple[Communicator, Group | None]


class CurvatureCapabilities(NamedTuple):
    """How the refresh path estimates and installs curvature for a mode.

    Attributes:
        estimates: whether this rank runs the estimator (pipelined update ranks do not).
        hvp_reduce: HVP reduction of the Lanczos run (``"mean"`` or ``"root0"``).
        lanczos_basis: layout of the Lanczos basis (``"sharded"`` or ``"replicated"``).
        lanczos_group: the ranks that run the Lanczos iteration together (``None``: all).
        warm_refresh: whether refreshes after the first may be warm-started.
        reuses_check: whether a refresh may continue from the staleness check of its step.
        gathers_vectors: whether the estimate's shard of V is all-gathered to full V (state kept
            in full, basis sharded).
        eigenvalue_shift: added to λ before η is computed (``admm``: ρ).
        weights: a context manager in which the model holds the weights the curvature is
            estimated at (``admm``: the consensus z).
    """

    estimates: bool
    hvp_reduce: str
    lanczos_basis: str
    lanczos_group: Group | None
    warm_refresh: bool
    reuses_check: bool
    gathers_vectors: bool
    eigenvalue_shift: float
    weights: Callable[[], Any]


class RefreshIfDue(NamedTuple):
    """Refresh before this update when the schedule says so (after the mode's
    :meth:`~dho2_tf.modes.base.Mode.before_refresh`)."""


class InstallPairs(NamedTuple):
    """Fold the momenta out of the old V, then install (λ, V_r, Γ) with ``status``."""

    eigenvalues: tf.Tensor
    vectors_r: tf.Tensor
    gram: tf.Tensor
    status: str


class KeepPairs(NamedTuple):
    """Count a refresh that installed nothing (the previous pairs stay), with ``status``."""

    status: str


class TriggerSent(NamedTuple):
    """The weights were handed over for a refresh at update ``step``."""

    step: int


class AverageStatistics(NamedTuple):
    """Average the bound model's non-trainable variables over the ranks (collective ``name``)
    and take them as the statistics a skipped step restores."""

    name: str


HostAction = Union[RefreshIfDue, InstallPairs, KeepPairs, TriggerSent, AverageStatistics]
