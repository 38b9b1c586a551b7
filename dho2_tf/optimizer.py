"""DHO2, the Keras optimizer: its wiring to Keras and to the pieces that do the work (state
:mod:`~dho2_tf.optimizer_state`, step :mod:`~dho2_tf.fosi_step`, refresh :mod:`~dho2_tf.refresh`,
distribution :mod:`~dho2_tf.modes`, host side :mod:`~dho2_tf.host_driver`, step callbacks
:mod:`~dho2_tf.step_hooks`)."""

from __future__ import annotations

import contextlib
import numbers
import types
from typing import Any, Callable

import tensorflow as tf

from dho2_tf import refresh, state_transfer
from dho2_tf.base_rules import BaseRule
from dho2_tf.curvature_input import check_curvature_input
from dho2_tf.consistency import verify_optimizer_consistency
from dho2_tf.distributed.comm import Communicator, default_comm
from dho2_tf.flat import FlatSpec, flatten
from dho2_tf.fosi_step import FosiStep
from dho2_tf.host_driver import HostDriver
from dho2_tf.hyperparameters import (DEFAULT_MEMORY_BUDGET, FIELD_NAMES, Hyperparameters,
                                     reject_unsupported)
from dho2_tf.modes import (MODES, ModeContext, StepPlan, make_mode, refresh_basis_rows,
                           replicated_state_bytes, resolve_layout)
from dho2_tf.modes.base import NOT_A_CURVATURE_RANK
from dho2_tf.optimizer_state import OptimizerState, Workspace
from dho2_tf.step_hooks import StepHooks
from dho2_tf.validation import check_real


def _hyperparameter(name: str) -> property:
    """A read-only property of the optimizer: ``hp.<name>``, the value in use."""
    return property(lambda self: getattr(self.hp, name),
                    doc=f"The ``{name}`` in use (read-only; see the class docstring).")


@tf.keras.utils.register_keras_serializable(package="dho2_tf")
class DHO2(tf.keras.optimizers.Optimizer):
    r"""Distributed hybrid-order optimizer: FOSI's Newton step in span(V), a base step elsewhere.

    Every ``refresh_every`` steps (after ``warmup``) a refresh estimates the k largest and ℓ
    smallest eigenpairs (λ, V) of the loss Hessian on a curvature batch (Lanczos the first time,
    then warm-started from the previous V); each step then takes a
    scaled Newton step in span(V) and a base-optimizer step (SGD, heavy ball, Nesterov or Adam)
    in its orthogonal complement. Gradients and Hessian-vector products are averaged over ranks.

    Math:
        λ, V (K = k+ℓ rows) the estimated eigenpairs; M(g, m) = A_g·g + A_m·m the base's
        Newton-momentum function (sgd (1,0), momentum (1,β), nesterov (1+β,β²), adam (1−β₁,β₁));
        Base the base optimizer's displacement. At each refresh: η_j = |1/(λ_j + σ_d)|,
        c = clip(|λ_max|/|λ_(k)|, 1, c_max). Each step, with Ḡ the rank-averaged gradient::

            g₁ = Vᵀ(V Ḡ),   g₂ = Ḡ − g₁
            m  ← M(g₁, m),  d = Vᵀ(η ⊙ (V m))
            u  = Base(g₂),  u ← u − Vᵀ(V u)
            θ  ← θ + c·u − α·d

        Before the first refresh V = 0, η = 0, c = 1: DHO2 is exactly the base optimizer.
        Refresh before update t iff t+1 ≥ W and (t+1−W) mod T = 0 (W = ``warmup``, T =
        ``refresh_every``; or adaptively, ``max_refresh_every``); the first refresh is Lanczos,
        later ones are warm-started from V (``refresh_method``). Cost: 2 passes over V per step (Adam 4, :mod:`dho2_tf.hybrid`)
        plus the mode's collectives (:mod:`dho2_tf.modes`). Sivan et al., "FOSI", ICLR 2024,
        arXiv 2302.08484, §3; Gu et al., "DHO2", arXiv 2505.00982; docs/algorithm.md.

    Note:
        A refresh needs the model, loss and a curvature batch: pass ``callbacks=[dho2_tf.
        CurvatureRefresh(batch=(x, y))]`` to ``fit``; in a custom loop use
        ``dho2_tf.training_loop`` (it calls :meth:`bind` and every hook). Weight decay must be
        an L2 term of the loss. Adam has ε outside √v̂, as in FOSI.

    Args:
        learning_rate: base learning rate, a float or a ``LearningRateSchedule`` (1e-3).
        base: ``"sgd"``, ``"momentum"``, ``"nesterov"`` or ``"adam"`` (default).
        k: number of largest eigenpairs (10). ell: number of smallest eigenpairs (0).
        alpha: Newton step size α ≥ 0 (0.1). c_max: clip of c, ≥ 1 (1: the base step keeps
            the base's learning rate; FOSI's 3 for non-Adam bases is unsafe between refreshes,
            docs/algorithm.md).
        lanczos_order: Lanczos iterations m ≥ k+ℓ (4(k+ℓ)). lanczos_dtype: the basis,
            ``"float32"``, ``"float64"`` or ``None`` (the model's; T is float64, BENCHMARKS.md).
        hvp_method: H·v ``"forward-over-reverse"`` (default) or ``"reverse-over-reverse"`` (the
            same product; the latter binds faster, the former can need less memory,
            :mod:`dho2_tf.curvature.hvp`).
        refresh_method: ``"warm"`` (default): every refresh after the first starts from the
            installed eigenvectors, block Krylov span[V, H̄V] with Rayleigh–Ritz, 2(K + p) HVPs
            in two block products (one collective each); ``"lanczos"``: a full Lanczos run
            from a random vector every time (m HVPs, one collective each; always so with
            ``pipelined``). :mod:`dho2_tf.curvature.warm_start`, docs/algorithm.md §3.6.
        warm_extra: p ≥ 0 random directions added to the warm refresh's start block (0).
        block_hvp: a block of HVPs as a ``"map"`` loop (default, one HVP's memory) or
            ``"vectorized"`` (``tf.vectorized_map``; more memory, fewer kernel launches).
            ``tf.vectorized_map`` cannot vectorise a variable assignment, so with
            ``"vectorized"`` the HVP skips the layers' state updates (batch norm's moving
            averages, unused by a training-mode product) instead of restoring them: the same
            products. A model with a layer that assigns a variable in its forward pass some
            other way (a custom counter, batch renormalisation) is refused at :meth:`bind`
            (ValueError naming the layer; use ``"map"``).
        refresh_every: refresh interval T > 0 (100). warmup: W ≥ 0 (``refresh_every``).
        max_refresh_every: ``None`` (default): refresh every T steps. An integer T_max ≥ T: the
            adaptive schedule, which every T steps checks the installed pairs with one block HVP
            and refreshes only when their staleness exceeds ``staleness_tol``, or after T_max
            steps (:mod:`dho2_tf.refresh_schedule`; not with ``pipelined``).
        staleness_tol: τ > 0 of the adaptive schedule: the largest relative residual or
            eigenvalue drift of the installed pairs it tolerates (0.1).
        eigenvalue_damping: σ_d ≥ 0 added to λ before inverting (0). momentum: β of
            ``momentum``/``nesterov`` (0.9). beta_1, beta_2, epsilon: Adam's (0.9, 0.999, 1e-8).
        mode: ``"replicated"`` (full state, one allreduce per step) and ``"sharded"`` (state
            1/P, 3-4 collectives per step) are exactly FOSI on the union of the ranks' batches;
            ``"auto"`` (default) picks ``"replicated"`` if it fits ``memory_budget`` (at
            ``build``, :attr:`resolved_mode`); ``"faithful"`` (the released DHO2 code),
            ``"pipelined"`` (curvature ranks work while update ranks train), ``"admm"``
            (consensus ADMM). Collectives and memory: :mod:`dho2_tf.modes`.
        memory_budget: bytes of replicated state per rank for ``mode="auto"`` (1 GiB).
        window_rule: ``"extrapolate"`` (``faithful`` only, its default) or ``"none"``.
        window_sigma: σ_w of the window rule's gradient offset (5e-9).
        curvature_ranks: ``pipelined``: size P_C of the curvature set, the last ranks (1).
        update_ranks: ``pipelined``: size P_U = world − P_C of the update set.
        delivery_delay: ``pipelined``: steps Δ ∈ [1, T] from a trigger to its delivery (⌈T/2⌉).
        rho: ``admm``: penalty ρ > 0 (1e-2). tau: ``admm``: local steps per round τ ≥ 1 (8).
        x_restart: ``admm``: after a round ``"keep"`` x (textbook) or restart from ``"z"``
            (default; robust with stochastic gradients, BENCHMARKS.md).
        nonfinite: ``"skip"`` (default: a step whose averaged gradient or base step holds
            NaN/Inf changes nothing, statistics included, and counts in ``skipped_steps``) or
            ``"raise"``. A non-finite curvature estimate always keeps the previous pairs.
        max_consecutive_skips: consecutive skips (≥ 1) before training stops on every rank (50).
        guard: trip ratio κ > 1 of the ‖Ḡ‖² divergence guard, 0 turns it off (1.5, dho2_tf.guard).
        seed: refresh j starts Lanczos from seed + j (0). comm: Horovod or local (not serialised).
        name, **kwargs: the optimizer name; Keras' ``clipnorm``, ``clipvalue``,
            ``global_clipnorm``, ``jit_compile``.
    """

    def __init__(self, learning_rate: float | Any = 1e-3, base: str = "adam", k: int = 10,
                 ell: int = 0, alpha: float = 0.1, c_max: float | None = 1.0,
                 lanczos_order: int | None = None, lanczos_dtype: str | None = None,
                 hvp_method: str = "forward-over-reverse", refresh_method: str = "warm",
                 warm_extra: int = 0, block_hvp: str = "map", refresh_every: int = 100,
                 warmup: int | None = None, max_refresh_every: int | None = None,
                 staleness_tol: float = 0.1, eigenvalue_damping: float = 0.0,
                 momentum: float = 0.9,
                 beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-8,
                 mode: str = "auto", window_rule: str | None = None, window_sigma: float = 5e-9,
                 curvature_ranks: int = 1, update_ranks: int | None = None,
                 delivery_delay: int | None = None, rho: float = 1e-2, tau: int = 8,
                 x_restart: str = "z", nonfinite: str = "skip", max_consecutive_skips: int = 50,
                 seed: int = 0, memory_budget: int = DEFAULT_MEMORY_BUDGET, guard: float = 1.5,
                 comm: Communicator | None = None, name: str = "DHO2", **kwargs: Any) -> None:
        super().__init__(name=name, **reject_unsupported(kwargs))
        self.rule = BaseRule(base, momentum=momentum, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon)
        arguments = locals()   # every hyper-parameter is an argument of the same name
        self.hp = Hyperparameters.resolve(**{key: arguments[key] for key in FIELD_NAMES})
        if isinstance(learning_rate, (numbers.Real, str)):  # schedules and tensors pass through
            check_real("learning_rate", learning_rate, minimum=0.0)
        self._learning_rate = self._build_learning_rate(learning_rate)
        self._comm = comm
        # "auto" is not a mode: its layout is chosen in build(); until then it behaves as
        # "sharded" (neither constrains the world nor uses process sets).
        self._layout_pending = mode not in MODES
        self._mode = make_mode(mode if mode in MODES else "sharded", self.hp)
        if comm is not None:
            self._mode.validate_world(comm)
        self.consistency_checked = False   # set by verify_consistency
        self.curvature = refresh.Curvature(self.hp)
        self.driver = HostDriver(self)
        self.hooks = StepHooks(self)

    # Read-only views of the hyper-parameters in use (``opt.k``, ``opt.mode``, ...).
    k = _hyperparameter("k")
    ell = _hyperparameter("ell")
    num_pairs = _hyperparameter("num_pairs")
    alpha = _hyperparameter("alpha")
    c_max = _hyperparameter("c_max")
    lanczos_order = _hyperparameter("lanczos_order")
    lanczos_dtype = _hyperparameter("lanczos_dtype")
    hvp_method = _hyperparameter("hvp_method")
    refresh_method = _hyperparameter("refresh_method")
    warm_extra = _hyperparameter("warm_extra")
    block_hvp = _hyperparameter("block_hvp")
    refresh_every = _hyperparameter("refresh_every")
    warmup = _hyperparameter("warmup")
    max_refresh_every = _hyperparameter("max_refresh_every")
    staleness_tol = _hyperparameter("staleness_tol")
    eigenvalue_damping = _hyperparameter("eigenvalue_damping")
    mode = _hyperparameter("mode")
    memory_budget = _hyperparameter("memory_budget")
    window_rule = _hyperparameter("window_rule")
    window_sigma = _hyperparameter("window_sigma")
    curvature_ranks = _hyperparameter("curvature_ranks")
    update_ranks = _hyperparameter("update_ranks")
    delivery_delay = _hyperparameter("delivery_delay")
    rho = _hyperparameter("rho")
    tau = _hyperparameter("tau")
    x_restart = _hyperparameter("x_restart")
    nonfinite = _hyperparameter("nonfinite")
    max_consecutive_skips = _hyperparameter("max_consecutive_skips")
    seed = _hyperparameter("seed")
    guard = _hyperparameter("guard")

    @property
    def binding(self) -> dict[str, Any] | None:
        """What :meth:`bind` compiled (:attr:`dho2_tf.refresh.Curvature.binding`), or ``None``."""
        return self.curvature.binding

    @property
    def last_refresh(self) -> dict[str, Any] | None:
        """The record of the latest refresh (:func:`dho2_tf.refresh.refresh_record`)."""
        return self.curvature.last_refresh

    @property
    def triggers(self) -> list[int]:
        """``pipelined``: the steps at which the weights were handed over for a refresh."""
        return self.curvature.triggers

    @property
    def compile_seconds(self) -> float:
        """The one-off cost of tracing the HVP and Lanczos graphs in :meth:`bind`."""
        return self.curvature.compile_seconds

    @property
    def is_curvature_rank(self) -> bool:
        """Whether this rank computes curvature instead of training (``pipelined``)."""
        mode = self._mode
        return not mode.all_ranks_train and mode.is_curvature_rank_in(self.comm)

    @property
    def comm(self) -> Communicator:
        """The communicator (resolved on first use with the process sets the mode needs)."""
        if self._comm is None:
            self._comm = default_comm(
                process_sets=self._mode.required_process_sets(),
                requested_by={"mode": self.hp.mode, "curvature_ranks": self.hp.curvature_ranks,
                              "update_ranks": self.hp.update_ranks})
        return self._comm

    @property
    def resolved_mode(self) -> str | None:
        """The mode in use (``"auto"``: the layout chosen at ``build``; ``None`` before)."""
        return None if self._layout_pending else self._mode.name

    @property
    def built(self) -> bool:
        """Whether ``build`` has created the state (Keras' own ``_built`` flag, set last)."""
        return bool(getattr(self, "_built", False))

    @property
    def distribution(self) -> Any:
        """The mode object (:mod:`dho2_tf.modes`): its capabilities, e.g. ``checkpointable``."""
        return self._mode

    def build(self, var_list: list[tf.Variable]) -> None:
        """Create the state in the mode's layout (:class:`OptimizerState`)."""
        super().build(var_list)
        if self.built:
            return
        self.spec, dtype = FlatSpec.of(var_list), var_list[0].dtype
        self.hp.check_fits(self.spec.n)   # before any state of size n or m is made
        if self._layout_pending:   # "auto": replicated if it fits memory_budget, else sharded
            self._mode, self._layout_pending = make_mode(resolve_layout(
                self.replicated_state_bytes(self.spec.n, dtype), self.hp, self.spec.n,
                len(self.rule.slot_names), self.comm.is_root,
                refresh.basis_dtype(self.hp.lanczos_dtype, dtype)), self.hp), False
        mode, comm = self._mode, self.comm
        mode.validate_world(comm)
        self.model_variables = list(var_list)
        self.layout = mode.layout(comm, self.spec.n)
        # Pipelined curvature ranks never update weights: they keep no parameter-sized state.
        s = 0 if self.is_curvature_rank else self.layout.shard_size
        self.state = OptimizerState.create(self.add_variable, self.rule, self.num_pairs, s,
                                           dtype)
        mode_state = {v.name: self.add_variable(list(v.shape), v.dtype, name=v.name)
                      for v in mode.state_variables(self.spec.n, dtype)}
        mode.attach(ModeContext(comm, self.hp, self.spec, self.layout, self.model_variables,
                                mode_state, self.state.refreshes))
        self.workspace = Workspace(self.rule, self.num_pairs, s, dtype, self.state.in_place)
        self.curvature.attach(self.state, self.workspace, mode.curvature_capabilities(comm),
                              comm, self.spec.n)
        self._fosi_step = FosiStep(self.state, self.workspace, self.rule, self.spec, self.hp,
                                   self.hooks)
        self._built = True   # Keras' own flag (set_weights, variables): see ``built``

    def replicated_state_bytes(self, n: int, dtype: tf.DType = tf.float32) -> int:
        """Bytes per rank of the ``replicated`` layout for n parameters (see ``mode="auto"``)."""
        basis = tf.as_dtype(refresh.basis_dtype(self.hp.lanczos_dtype, dtype))
        return replicated_state_bytes(n, len(self.rule.slot_names), self.num_pairs,
                                      refresh_basis_rows(self.hp), tf.as_dtype(dtype).size,
                                      basis.size)

    def state_bytes(self) -> int:
        """Bytes of this rank's optimizer and curvature state (all variables but counters)."""
        skip = {id(self.iterations), id(self.state.skipped)}
        return int(sum(v.shape.num_elements() * v.dtype.size for v in self.variables
                       if id(v) not in skip))

    def curvature_metrics(self) -> dict[str, float]:
        """Scalars worth monitoring: eigenvalue_j, lr_scale, refreshes, refresh_seconds, guard_*."""
        return {**self.curvature.metrics(), **self._fosi_step.metrics(),
                **self._mode.metrics()} if self.built else {}

    def apply_gradients(self, grads_and_vars, name: str | None = None,
                        skip_gradients_aggregation: bool = False, **kwargs: Any) -> tf.Variable:
        """Apply one hybrid step to all variables (gradients are combined by the mode)."""
        grads_and_vars = list(grads_and_vars)
        if not grads_and_vars:
            return self.iterations
        grads, variables = zip(*grads_and_vars)
        self._compute_current_learning_rate()
        with tf.name_scope(name or self.name):
            with tf.init_scope():
                self.build(list(variables))
            if [v.ref() for v in variables] != [v.ref() for v in self.model_variables]:
                raise ValueError("DHO2 updates the whole flat parameter vector: apply_gradients "
                                 "must receive the same variables, in the same order, as when "
                                 "it was built.")
            grads = [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g)
                     for g, v in zip(grads, variables)]
            with tf.control_dependencies(self.hooks.check_wiring()):   # a refused step: no-op
                self._distributed_step(self._mode.step_plan(), self._clip_gradients(grads),
                                       list(variables))
                for var in variables:   # as Keras' optimizers do; only constrained variables
                    if getattr(var, "constraint", None) is not None:
                        var.assign(var.constraint(var))
                self.iterations.assign_add(1)
        return self.iterations

    def _distributed_step(self, plan: StepPlan, grads: list[tf.Tensor],
                          variables: list[tf.Variable]) -> None:
        """Carry out the mode's :class:`~dho2_tf.modes.context.StepPlan` (graph-safe): reduce
        the flat gradient, adjust it, then the FOSI step (:class:`FosiStep`) with the plan's
        gather of δ and projection group."""
        comm, layout = self.comm, self.layout
        g = flatten(grads, self.spec, variables[0].dtype)
        if plan.reduce == "allreduce":
            g = comm.allreduce(g, "mean", name="dho2/gradient", process_set=plan.group)
        elif plan.reduce == "reducescatter":
            g = comm.reducescatter(layout.pad(g), "mean", name="dho2/gradient",
                                   process_set=plan.group)
        if plan.adjust is not None:
            g = plan.adjust(g, variables)
        gather = None
        if plan.gather:
            def gather(delta_r: tf.Tensor) -> tf.Tensor:
                return layout.unpad(comm.allgather(delta_r, name="dho2/delta",
                                                   process_set=plan.group))
        self._fosi_step(g, variables, self.learning_rate, self.iterations + 1, plan.projection,
                        self.driver.shadow_pairs(), gather=gather)

    def update_step(self, gradient, variable):  # noqa: D102 - DHO2 updates in apply_gradients
        raise NotImplementedError("DHO2 updates the flat vector in apply_gradients.")

    def bind(self, model: tf.keras.Model, loss: Callable | str | None, batch: tuple,
             *, training: bool = True) -> None:
        """Give the optimizer what a refresh needs and compile the curvature graphs now:
        ``model`` (its ``trainable_variables`` are optimised), ``loss`` (``loss(y_true, y_pred)``,
        a Keras loss name, or ``None`` for ``model.loss``), this rank's curvature ``batch``
        ``(x, y)``, and ``training`` (batch-norm batch statistics in the HVPs; the moving
        statistics are restored after each, or not updated with ``block_hvp="vectorized"``).
        ValueError: :func:`check_curvature_input`; with ``block_hvp="vectorized"``, a layer
        that assigns a variable in its forward pass (see ``block_hvp``)."""
        check_curvature_input(model, batch)
        self.build(model.trainable_variables)
        self.curvature.bind(model, loss, batch, training)

    def on_step_begin(self, iterations: int | None = None) -> None:
        """Call before every update (eager): refresh, window jump, pipeline hand-over.
        ``iterations``: the step count, when the caller keeps it (then no variable is read;
        :meth:`dho2_tf.host_driver.HostDriver.begin`)."""
        self.driver.begin(iterations)

    def on_step_end(self, iterations: int | None = None) -> None:
        """Call after every update (eager): ADMM rounds. ``iterations``: the count after it
        (default: one more than :meth:`on_step_begin` saw; then skipped steps are logged)."""
        self.driver.end(iterations)

    def on_train_end(self) -> None:
        """Call once when training stops (pipelined: releases the curvature ranks)."""
        self.driver.finish()

    def sync_host_state(self) -> int:
        """Re-read what the host keeps after variables changed outside a step
        (:meth:`dho2_tf.host_driver.HostDriver.resync`); returns the step count."""
        return self.driver.resync()

    def set_weights(self, weights: list[Any]) -> None:
        """Keras' ``set_weights``, then forget every cache derived from the old values."""
        super().set_weights(weights)
        self.driver.forget_caches()

    def verify_consistency(self, model: tf.keras.Model, fit: dict | None = None) -> None:
        """Compare config, mode, world, variables and ``fit``'s steps/epochs across ranks."""
        self.consistency_checked = True
        verify_optimizer_consistency(self.comm, self.get_config(), self.resolved_mode, model, fit)

    def ensure_consistency(self, model: Any = None) -> None:
        """:meth:`verify_consistency` unless it already ran (collective then: every rank calls
        it at the same point), for ``model``, else the bound model, else the optimizer's own
        variables."""
        if self.consistency_checked:
            return
        if model is None:
            model = self.driver.bound_model()
        if model is None:
            model = types.SimpleNamespace(trainable_variables=list(self.model_variables),
                                          name="model")
        self.verify_consistency(model)

    def serve_curvature(self) -> list[dict[str, Any]]:
        """Pipelined curvature ranks: serve refreshes until the update ranks stop (after
        :meth:`bind`, once per ``fit`` of the update ranks); one record per refresh served."""
        if not self.is_curvature_rank:
            raise RuntimeError(NOT_A_CURVATURE_RANK)
        self.curvature.require_binding()
        self.ensure_consistency()   # as the update ranks' first step
        return self._mode.serve(self.curvature.binding["estimator"])

    def export_state(self) -> dict[str, Any]:
        """This rank's state, sharded vectors gathered to full length (collective; every rank
        holding state calls it), so :meth:`import_state` can re-partition it."""
        return state_transfer.export_optimizer_state(self)

    def import_state(self, state: dict[str, Any]) -> None:
        """Load :meth:`export_state` output into this built optimizer, re-sharding as needed;
        ValueError on a mode mismatch or a rank-local state from another world size."""
        state_transfer.import_optimizer_state(self, state)
        self.driver.forget_caches()

    def evaluation_weights(self) -> Any:
        """Context in which the model holds the weights to evaluate (ADMM: the consensus z)."""
        return self._mode.evaluation_weights() if self.built else contextlib.nullcontext()

    def broadcast_state(self, model: tf.keras.Model, root: int = 0) -> None:
        """At step 0, copy the model weights from ``root`` to the training ranks (the optimizer
        state is identical there at step 0, and sharded or rank-local later;
        :meth:`dho2_tf.host_driver.HostDriver.broadcast_weights`)."""
        self.driver.broadcast_weights(model, root)

    def request_refresh(self, reason: str) -> None:
        """Refresh the curvature before the next update, whatever the schedule says (every rank
        must call it at the same step; :meth:`dho2_tf.refresh.Curvature.request_refresh`)."""
        self.curvature.request_refresh(reason)

    def refresh_index(self) -> int:
        """Number of refreshes done so far (also the next refresh's seed offset)."""
        return self.curvature.index()

    def refresh_curvature(self) -> dict[str, Any]:
        """Estimate and install the extreme eigenpairs now (eager, every rank at the same step;
        :meth:`dho2_tf.refresh.Curvature.refresh`). Raises RuntimeError before :meth:`bind`."""
        return self.curvature.refresh()

    def get_config(self) -> dict[str, Any]:
        """Every constructor argument under its own name (``comm`` excluded)."""
        config = super().get_config()
        for key in ("weight_decay", "use_ema", "ema_momentum", "ema_overwrite_frequency"):
            config.pop(key, None)
        config.update(self.hp.config(), base=self.rule.name, momentum=self.rule.momentum,
                      beta_1=self.rule.beta_1, beta_2=self.rule.beta_2,
                      epsilon=self.rule.epsilon,
                      learning_rate=self._serialize_hyperparameter(self._learning_rate))
        return config
