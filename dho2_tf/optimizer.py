"""DHO2: the Keras optimizer users compile their model with (the Keras wiring only).

The state is :class:`~dho2_tf.optimizer_state.OptimizerState`, the step
:class:`~dho2_tf.fosi_step.FosiStep`, the refresh :mod:`dho2_tf.refresh`, the distribution
:mod:`dho2_tf.modes`, export and import :mod:`dho2_tf.state_transfer`.
"""

from __future__ import annotations

import contextlib
import numbers
import time
import types
from typing import Any, Callable, Iterator

import tensorflow as tf

from dho2_tf import hybrid, refresh, state_transfer
from dho2_tf.base_rules import BaseRule
from dho2_tf.consistency import verify_optimizer_consistency
from dho2_tf.distributed.comm import Communicator, default_comm
from dho2_tf.flat import FlatSpec
from dho2_tf.fosi_step import FosiStep, SkipLog
from dho2_tf.hyperparameters import DEFAULT_MEMORY_BUDGET, FIELD_NAMES, Hyperparameters
from dho2_tf.modes import MODES, make_mode, replicated_state_bytes, resolve_layout
from dho2_tf.optimizer_state import HostState, OptimizerState, StatShadows, Workspace
from dho2_tf.validation import check_real


@tf.keras.utils.register_keras_serializable(package="dho2_tf")
class DHO2(tf.keras.optimizers.Optimizer):
    r"""Distributed hybrid-order optimizer: FOSI's Newton step in span(V), a base step elsewhere.

    Every ``refresh_every`` steps (after ``warmup``) a Lanczos run estimates the k largest and ℓ
    smallest eigenpairs (λ, V) of the loss Hessian on a curvature batch; each step then takes a
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
        ``refresh_every``). A step whose averaged gradient or base step holds NaN/Inf changes
        nothing (``nonfinite``). Sivan et al., "FOSI", ICLR 2024, arXiv 2302.08484, §3; Gu et
        al., "DHO2", arXiv 2505.00982; docs/algorithm.md.

    Cost of a step: two passes over V for ``sgd``/``momentum``/``nesterov``, four for Adam (the
    momenta are kept in the basis of V between refreshes, :mod:`dho2_tf.hybrid`), a few passes
    over n and the mode's collectives (table in :mod:`dho2_tf.modes`).

    Note:
        A refresh needs the model, the loss and a curvature batch: with ``fit`` pass
        ``callbacks=[dho2_tf.CurvatureRefresh(batch=(x, y))]``; in a custom loop call
        :meth:`bind` once, :meth:`on_step_begin` before and :meth:`on_step_end` after each
        ``apply_gradients``, and :meth:`on_train_end` at the end. Without either, every rank
        warns when the first refresh is due (and DHO2 stays its base optimizer). Weight decay
        must be an L2 term of the loss (``weight_decay`` is rejected). Adam runs on the flat
        vector with ε outside √v̂, as in FOSI.

    Args:
        learning_rate: base learning rate, a float or a ``LearningRateSchedule`` (1e-3).
        base: ``"sgd"``, ``"momentum"``, ``"nesterov"`` or ``"adam"`` (default).
        k: number of largest eigenpairs (10). ell: number of smallest eigenpairs (0).
        alpha: Newton step size α ≥ 0 (0.1). c_max: clip of c, ≥ 1 (1 for Adam, else 3).
        lanczos_order: Lanczos iterations m ≥ k+ℓ (4(k+ℓ)).
        lanczos_dtype: ``"float32"``, ``"float64"`` or ``None`` (the model's precision): the
            Lanczos basis (its coefficients and T are always float64; a float32 basis agrees
            to about 1e-5 of |λ_max|, BENCHMARKS.md).
        refresh_every: refresh interval T > 0 (100). warmup: W ≥ 0 (``refresh_every``).
        eigenvalue_damping: σ_d ≥ 0 added to λ before inverting (0).
        momentum: β of ``momentum``/``nesterov`` (0.9). beta_1, beta_2, epsilon: Adam's
            (0.9, 0.999, 1e-8).
        mode: ``"auto"`` (default: ``"replicated"`` when its state fits ``memory_budget``, else
            ``"sharded"``, chosen at ``build`` independently of P: :attr:`resolved_mode`),
            ``"replicated"`` (full state per rank, one gradient allreduce per step),
            ``"sharded"`` (state 1/P, three or four dependent collectives per step) — both
            exactly single-process FOSI on the union of the ranks' batches —, ``"faithful"``
            (the released DHO2 code's design), ``"pipelined"`` (curvature ranks compute while
            update ranks train) or ``"admm"`` (consensus ADMM, τ local steps per round).
            Collectives and memory of each: :mod:`dho2_tf.modes`.
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
            NaN/Inf, or whose sum overflows, changes no weight, slot or momentum; the bound
            model's statistics are restored and ``skipped_steps`` counts it, every rank agreeing)
            or ``"raise"``. A non-finite curvature estimate always keeps the previous pairs.
        max_consecutive_skips: consecutive skipped steps (≥ 1) tolerated before training stops
            with an error on every rank (50).
        seed: seed of the Lanczos start vectors; refresh j uses ``seed + j`` (0).
        comm: communicator (not serialised): Horovod under ``horovodrun``, else local.
        name: optimizer name (``"DHO2"``).
        **kwargs: Keras' ``clipnorm``, ``clipvalue``, ``global_clipnorm``, ``jit_compile``.
    """

    def __init__(self, learning_rate: float | Any = 1e-3, base: str = "adam", k: int = 10,
                 ell: int = 0, alpha: float = 0.1, c_max: float | None = None,
                 lanczos_order: int | None = None, lanczos_dtype: str | None = None,
                 refresh_every: int = 100, warmup: int | None = None,
                 eigenvalue_damping: float = 0.0, momentum: float = 0.9, beta_1: float = 0.9,
                 beta_2: float = 0.999, epsilon: float = 1e-8, mode: str = "auto",
                 window_rule: str | None = None, window_sigma: float = 5e-9,
                 curvature_ranks: int = 1, update_ranks: int | None = None,
                 delivery_delay: int | None = None, rho: float = 1e-2, tau: int = 8,
                 x_restart: str = "z", nonfinite: str = "skip", max_consecutive_skips: int = 50,
                 seed: int = 0, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 comm: Communicator | None = None, name: str = "DHO2", **kwargs: Any) -> None:
        for key in ("weight_decay", "use_ema"):
            if kwargs.pop(key, None):
                raise ValueError(f"`{key}` is not supported by DHO2" + (
                    ": add an L2 term to the loss so the curvature estimate sees it"
                    if key == "weight_decay" else "") + ".")
        super().__init__(name=name, **kwargs)
        self.rule = BaseRule(base, momentum=momentum, beta_1=beta_1, beta_2=beta_2,
                             epsilon=epsilon)
        self.hp = Hyperparameters.resolve(
            default_c_max=self.rule.default_c_max, k=k, ell=ell, alpha=alpha, c_max=c_max,
            lanczos_order=lanczos_order, lanczos_dtype=lanczos_dtype,
            refresh_every=refresh_every, warmup=warmup, eigenvalue_damping=eigenvalue_damping,
            mode=mode, memory_budget=memory_budget, window_rule=window_rule,
            window_sigma=window_sigma, curvature_ranks=curvature_ranks,
            update_ranks=update_ranks, delivery_delay=delivery_delay, rho=rho, tau=tau,
            x_restart=x_restart, nonfinite=nonfinite,
            max_consecutive_skips=max_consecutive_skips, seed=seed)
        if isinstance(learning_rate, (numbers.Real, str)):  # schedules and tensors pass through
            check_real("learning_rate", learning_rate, minimum=0.0)
        self._learning_rate = self._build_learning_rate(learning_rate)
        self._comm = comm
        # "auto" is not a mode: its layout is chosen in build(); until then it behaves as
        # "sharded" (neither constrains the world nor uses process sets).
        self._layout_pending = mode not in MODES
        self._mode = make_mode(mode if mode in MODES else "sharded", self)
        if comm is not None:
            self._mode.validate_world()
        self.binding: dict[str, Any] | None = None
        self.last_refresh: dict[str, Any] | None = None
        self.triggers: list[int] = []
        self._host = HostState()
        self._skips = SkipLog()
        self._stat_shadows: StatShadows | None = None

    def __getattr__(self, name: str) -> Any:
        """The hyper-parameters read as attributes: ``opt.k``, ``opt.refresh_every``, ..."""
        hp = self.__dict__.get("hp")
        if hp is not None and name in FIELD_NAMES:
            return getattr(hp, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ----------------------------------------------------------------------------------- state
    @property
    def comm(self) -> Communicator:
        """The communicator (resolved on first use with the process sets the mode needs)."""
        if self._comm is None:
            self._comm = default_comm(process_sets=self._mode.required_process_sets())
        return self._comm

    @property
    def num_pairs(self) -> int:
        """K = k + ℓ."""
        return self.hp.num_pairs

    @property
    def resolved_mode(self) -> str | None:
        """The mode in use (for ``"auto"`` the layout chosen at ``build``, ``None`` before);
        checkpoints and exported states record it."""
        return None if self._layout_pending else self._mode.name

    @property
    def distribution(self) -> Any:
        """The mode object (:mod:`dho2_tf.modes`) and its capabilities, e.g.
        ``state_is_rank_local``, ``checkpointable``, ``can_import(mode)``."""
        return self._mode

    @property
    def is_curvature_rank(self) -> bool:
        """True on the ranks of a pipelined run that compute curvature instead of training."""
        return self._mode.is_curvature_rank

    def build(self, var_list: list[tf.Variable]) -> None:
        """Create the state in the mode's layout (:class:`OptimizerState`)."""
        super().build(var_list)
        if hasattr(self, "state"):
            return
        self.spec = FlatSpec.of(var_list)
        dtype = var_list[0].dtype
        if self._layout_pending:
            self._mode = make_mode(resolve_layout(
                self.replicated_state_bytes(self.spec.n, dtype), self.hp, self.spec.n,
                len(self.rule.slot_names), self.comm.is_root), self)
            self._layout_pending = False
        self._mode.validate_world()
        self._built = True   # Keras' flag (set_weights, variables)
        self.model_variables = list(var_list)
        self.layout = self._mode.layout(self.spec.n)
        # Pipelined curvature ranks never update weights: they keep no parameter-sized state.
        s = 0 if self.is_curvature_rank else self.layout.shard_size
        self.state = OptimizerState.create(self.add_variable, self.rule, self.num_pairs, s,
                                           dtype)
        self._sharded_ids = {id(v) for v in self.state.parameter_sized} \
            if self._mode.shards_state else set()
        self._mode.build(var_list)
        self.workspace = Workspace(self.rule, self.num_pairs, s, dtype, self.state.in_place)
        self._fosi_step = FosiStep(
            self.state, self.workspace, self.rule, self.spec, self.hp.alpha, self.hp.nonfinite,
            self.hp.max_consecutive_skips,
            lambda step, total: self._skips.log_step(step, total, self.comm.is_root))

    def replicated_state_bytes(self, n: int, dtype: tf.DType = tf.float32) -> int:
        """Bytes per rank of the ``replicated`` layout for n parameters (see ``mode="auto"``)."""
        return replicated_state_bytes(n, len(self.rule.slot_names), self.num_pairs,
                                      self.hp.lanczos_order, tf.as_dtype(dtype).size)

    def state_bytes(self) -> int:
        """Bytes of this rank's optimizer and curvature state (all variables but counters)."""
        skip = {id(self.iterations), id(self.state.skipped)}
        return int(sum(v.shape.num_elements() * v.dtype.size for v in self.variables
                       if id(v) not in skip))

    def curvature_metrics(self) -> dict[str, float]:
        """Scalars worth monitoring: eigenvalue_j, lr_scale, refreshes, refresh_seconds, mode's."""
        if not hasattr(self, "state"):
            return {}
        st = self.state
        out = {f"eigenvalue_{j}": float(v) for j, v in enumerate(st.eigenvalues.numpy())}
        out.update(lr_scale=float(st.scale.numpy()), refreshes=float(st.refreshes.numpy()),
                   skipped_steps=float(st.skipped.numpy()))
        if self.last_refresh is not None:
            out["refresh_seconds"] = float(self.last_refresh["seconds"])
        if getattr(self, "compile_seconds", 0.0):
            out["curvature_compile_seconds"] = float(self.compile_seconds)
        out.update(self._mode.metrics())
        return out

    # ----------------------------------------------------------------------------------- step
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
            if self.binding is None:
                self._check_curvature_source()
            self._mode.step(self._clip_gradients(grads), list(variables))
            for var in variables:   # as Keras' optimizers do; only constrained variables
                if getattr(var, "constraint", None) is not None:
                    var.assign(var.constraint(var))
            self.iterations.assign_add(1)
        return self.iterations

    def apply_fosi_step(self, g_r: tf.Tensor, variables: list[tf.Variable],
                        gather: Callable[[tf.Tensor], tf.Tensor] | None = None) -> None:
        """The FOSI step from this rank's averaged-gradient shard (:class:`FosiStep`)."""
        shadows = self._stat_shadows
        bound = self.binding["model"] if self.binding else None
        stats = shadows.pairs if shadows is not None and shadows.model is bound else []
        self._fosi_step(g_r, variables, self.learning_rate, self.iterations + 1,
                        self._mode.projection_comm(), stats, gather=gather)

    def _check_curvature_source(self) -> None:
        """In a step traced before :meth:`bind`: once the first refresh is due, warn (every
        rank, eagerly) that nothing is bound and run the rank check the fit path runs."""
        due = hybrid.next_refresh_step(0, self.hp.warmup, self.hp.refresh_every)
        checked = self.workspace.source_checked
        pending = tf.logical_and(self.iterations >= due, tf.logical_not(checked))

        def check() -> None:
            tf.py_function(self._no_curvature_source, [], [])
            checked.assign(True)

        tf.cond(pending, check, lambda: None)

    def _no_curvature_source(self) -> None:
        if self.binding is not None or self._host.source_warned:
            return
        self._host.source_warned = True
        refresh.warn_no_curvature_source(
            hybrid.next_refresh_step(0, self.hp.warmup, self.hp.refresh_every), self.rule.name)
        if not getattr(self, "consistency_checked", False):
            self.verify_consistency(types.SimpleNamespace(
                trainable_variables=list(self.model_variables), name="model"))

    def materialize_momentum(self) -> None:
        """Fold the momenta out of the basis of V before V changes
        (:meth:`OptimizerState.materialize_momentum`) and drop the cached projections."""
        if hasattr(self, "state"):
            self.state.materialize_momentum()
            self.workspace.projected_at.assign(-1)

    def ensure_stat_shadows(self) -> bool:
        """Create the copies of the bound model's non-trainable variables a skipped step restores
        (eager; call after :meth:`bind`, before the first step). Returns whether it did now."""
        model = self.binding["model"] if self.binding else None
        if model is None or (self._stat_shadows is not None and self._stat_shadows.model is model):
            return False
        self._stat_shadows = StatShadows(model)
        return True

    def update_step(self, gradient, variable):  # noqa: D102 - DHO2 updates in apply_gradients
        raise NotImplementedError("DHO2 updates the flat vector in apply_gradients.")

    # --------------------------------------------------------------------- eager training hooks
    def bind(self, model: tf.keras.Model, loss: Callable | str | None, batch: tuple,
             *, training: bool = True) -> None:
        """Give the optimizer what a refresh needs and compile the curvature graphs now.

        Args:
            model: the model being trained (its ``trainable_variables`` are the optimised ones).
            loss: ``loss(y_true, y_pred)``, a Keras loss name, or ``None`` for ``model.loss``.
            batch: ``(x, y)`` curvature batch of this rank (kept fixed across refreshes).
            training: run the model in training mode during HVPs (batch-norm batch statistics;
                moving statistics are restored after each HVP).
        """
        self.build(model.trainable_variables)
        if self.binding is not None and self.binding["key"] == refresh.binding_key(
                model, loss, batch, training):
            return  # the same binding (e.g. a second fit call): keep the compiled graphs
        self.binding = refresh.bind_curvature(model, loss, batch, training,
                                              self._mode.make_estimator, self.hp.lanczos_dtype)
        self.compile_seconds = self.binding["compile_seconds"]
        if self.comm.is_root and self.binding["estimator"] is not None:
            refresh.logger.info("DHO2 compiled the curvature graphs in %.2fs (n=%d, m=%d, %s)",
                                self.compile_seconds, self.spec.n, self.hp.lanczos_order,
                                self.binding["estimator"].basis_layout)

    def basis_dtype_for(self, model_dtype: tf.DType) -> str:
        """The Lanczos basis dtype: ``lanczos_dtype``, or the model's precision when None."""
        return refresh.basis_dtype(self.hp.lanczos_dtype, model_dtype)

    def on_step_begin(self, iterations: int | None = None) -> None:
        """Call before every update (eager): refresh, window jump, pipeline hand-over.
        ``iterations`` is the step count when the caller keeps it (then nothing is read)."""
        if iterations is None:
            iterations = int(self.iterations.numpy())
            self._host.refreshes = None
            self.ensure_stat_shadows()
        self._host.begun_at = iterations
        self._mode.on_step_begin(iterations)

    def on_step_end(self, iterations: int | None = None) -> None:
        """Call after every update (eager): ADMM rounds. ``iterations`` is the count after it
        (default: one more than :meth:`on_step_begin` saw; then skipped steps are logged)."""
        if iterations is None:
            begun = self._host.begun_at
            iterations = int(self.iterations.numpy()) if begun is None else begun + 1
            self._host.begun_at = None
            self.report_skipped()
        self._mode.on_step_end(iterations)

    def sync_host_state(self) -> int:
        """Re-read what the eager hooks keep in Python after variables were changed outside a
        step (restored, averaged) and copy the statistics; returns the step count."""
        self._host.refreshes = None
        self._mode.sync_host_state()
        if not self.ensure_stat_shadows():
            self.sync_stat_shadows()
        return int(self.iterations.numpy())

    def set_weights(self, weights: list[Any]) -> None:
        """Keras' ``set_weights``, then forget every cache derived from the old values."""
        super().set_weights(weights)
        self.workspace.projected_at.assign(-1)
        self.sync_host_state()

    def sync_stat_shadows(self) -> None:
        """Copy the bound model's statistics into the copies a skipped step restores."""
        if self._stat_shadows is not None:
            self._stat_shadows.sync()

    def report_skipped(self) -> int:
        """Log a warning if steps were skipped since the last report; returns the count."""
        if not hasattr(self, "state"):
            return 0
        return self._skips.report(int(self.state.skipped.numpy()), self.comm.is_root)

    def verify_consistency(self, model: tf.keras.Model) -> None:
        """Compare configuration, mode, world size and variables across ranks (collective;
        :func:`dho2_tf.consistency.verify_optimizer_consistency`)."""
        self.consistency_checked = True
        verify_optimizer_consistency(self.comm, self.get_config(), self.resolved_mode, model)

    def on_train_end(self) -> None:
        """Call once when training stops (pipelined: releases the curvature ranks)."""
        self._mode.on_train_end()
        self.report_skipped()

    def serve_curvature(self) -> list[dict[str, Any]]:
        """Pipelined curvature ranks: serve refreshes until the update ranks stop (call after
        :meth:`bind`, once per ``fit`` of the update ranks; one record per refresh served)."""
        if not self.is_curvature_rank:
            raise RuntimeError("serve_curvature() runs only on the curvature ranks of "
                               "mode='pipelined'; update ranks train with fit().")
        self._require_binding()
        if not getattr(self, "consistency_checked", False):  # as the update ranks' first step
            self.verify_consistency(self.binding["model"])
        return self._mode.serve()

    def export_state(self) -> dict[str, Any]:
        """This rank's state with sharded vectors gathered to full length (collective), so
        :meth:`import_state` can re-partition it (:mod:`dho2_tf.state_transfer`)."""
        return state_transfer.export_state(self.variables, self._sharded_ids, self.spec.n,
                                           self.comm, self._mode.group, self.resolved_mode)

    def import_state(self, state: dict[str, Any]) -> None:
        """Load :meth:`export_state` output into this built optimizer, re-sharding as needed.

        Raises:
            ValueError: on a mode mismatch, or a rank-local state from another world size.
        """
        if not self._mode.can_import(state.get("__mode__")):
            raise ValueError(f"Checkpoint state is for mode={state.get('__mode__')!r}, this "
                             f"optimizer has mode={self.resolved_mode!r}.")
        self._mode.check_import_world(state.get("__world_size__"))
        state_transfer.import_state(self.variables, self._sharded_ids, self.layout, state,
                                    self.state.coordinate_defaults())
        self.workspace.projected_at.assign(-1)
        self.sync_host_state()

    @contextlib.contextmanager
    def evaluation_weights(self) -> Iterator[None]:
        """Context in which the model holds the weights to evaluate (ADMM: the consensus z)."""
        with self._mode.evaluation_weights() if hasattr(self, "state") \
                else contextlib.nullcontext():
            yield

    def broadcast_state(self, model: tf.keras.Model, root: int = 0) -> None:
        """At step 0, copy the model weights from ``root`` to the training ranks (the optimizer
        state is identical there at step 0, and sharded or rank-local later)."""
        if not (hasattr(self, "state") and int(self.iterations.numpy()) > 0):
            state_transfer.broadcast_weights(model.variables, self.comm,
                                             self._mode.broadcast_group(), root)

    # ------------------------------------------------------------------------------- refresh
    def refresh_index(self) -> int:
        """Number of refreshes done so far (also the next refresh's seed offset)."""
        return int(self.state.refreshes.numpy())

    def refresh_due(self, iterations: int | None = None) -> bool:
        """Whether a refresh is due before update ``iterations`` (default: the next one). With
        ``iterations`` given, a Python copy of the refresh counter is used: no variable read."""
        if not hasattr(self, "state"):
            return False
        if iterations is None:
            iterations = int(self.iterations.numpy())
            self._host.refreshes = None
        if self._host.refreshes is None:
            self._host.refreshes = self.refresh_index()
        return iterations >= hybrid.next_refresh_step(self._host.refreshes, self.hp.warmup,
                                                      self.hp.refresh_every)

    def record_trigger(self, step: int) -> None:
        """Pipelined mode: remember the step at which weights were handed over."""
        self.triggers.append(step)

    def _require_binding(self) -> None:
        if self.binding is None:
            raise RuntimeError(refresh.MISSING_BINDING)

    def refresh_curvature(self) -> dict[str, Any]:
        """Estimate the extreme eigenpairs at the current weights and install them (eager,
        every rank at the same step). A non-finite estimate keeps the previous eigenpairs.

        Raises:
            RuntimeError: when called before :meth:`bind`.
        """
        self._require_binding()
        start = time.perf_counter()
        est = self._mode.estimate()
        if est.num_valid > 0 and est.status.startswith(("ok", "breakdown")):
            self.install_curvature(est.eigenvalues, self._mode.vectors_for_state(est.vectors_r),
                                   est.gram, status=est.status, start=start)
        else:
            refresh.logger.warning("DHO2 curvature refresh %d kept the previous eigenpairs: %s",
                                   self.refresh_index(), est.status)
            self.count_refresh(installed=False, status=est.status, start=start)
        return self.last_refresh

    def install_curvature(self, eigenvalues: tf.Tensor, vectors: tf.Tensor, gram: tf.Tensor,
                          status: str, start: float | None = None) -> None:
        """Install (λ, V in the state layout, Γ) and derive η and c (see ``Math:``)."""
        self.state.install(eigenvalues, vectors, gram, self._mode.eigenvalue_shift(),
                           self.hp.eigenvalue_damping, self.hp.ell, self.hp.c_max)
        self.count_refresh(installed=True, status=status, start=start)

    def count_refresh(self, installed: bool, status: str, start: float | None = None) -> None:
        """Advance the refresh counter and record what happened (logged on rank 0)."""
        index = self.refresh_index()
        self.state.refreshes.assign_add(1)
        self._host.refreshes = index + 1
        self.last_refresh = refresh.refresh_record(index, status, installed, start,
                                                   self.state.eigenvalues, self.state.scale,
                                                   self.comm.is_root)

    # -------------------------------------------------------------------------------- config
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
