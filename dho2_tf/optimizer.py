"""DHO2: the Keras optimizer users compile their model with."""

from __future__ import annotations

import contextlib
import logging
import numbers
import time
import types
from typing import Any, Callable, Iterator

import tensorflow as tf

from dho2_tf import hybrid
from dho2_tf.base_rules import BaseRule
from dho2_tf.distributed.comm import Communicator, default_comm
from dho2_tf.flat import FlatSpec, assign_add_flat
from dho2_tf.losses import resolve_loss
from dho2_tf.modes import MODE_CHOICES, choose_layout, make_mode, replicated_state_bytes
from dho2_tf.optimizer_state import HostState, StatShadows, Workspace
from dho2_tf.validation import check_int, check_real

NONFINITE_POLICIES = ("skip", "raise")

logger = logging.getLogger(__name__)

#: Default ``memory_budget`` of ``mode="auto"``: 1 GiB of replicated state per rank.
DEFAULT_MEMORY_BUDGET = 1 << 30

#: Shard length from which Adam updates its slots in place with TF's fused kernel (one pass
#: instead of eleven element-wise ones; the kernel's fixed cost makes it slower below).
IN_PLACE_MIN_SIZE = 1 << 16


@tf.keras.utils.register_keras_serializable(package="dho2_tf")
class DHO2(tf.keras.optimizers.Optimizer):
    r"""Distributed hybrid-order optimizer: FOSI's Newton step in span(V), a base step elsewhere.

    Every ``refresh_every`` steps (after ``warmup``) a Lanczos run estimates the k largest and ℓ
    smallest eigenpairs (λ, V) of the loss Hessian on a curvature batch; each step then takes a
    scaled Newton step in span(V) and a base-optimizer step (SGD, heavy ball, Nesterov or Adam)
    in its orthogonal complement. Gradients and Hessian-vector products are averaged over all
    ranks; the parameter-sized optimizer state (V, momentum, base slots) is either replicated on
    every rank or sharded 1/P (see ``mode``).

    Math:
        Symbols: λ, V (K = k+ℓ rows) the estimated eigenpairs; α = ``alpha``; c_max = ``c_max``;
        σ_d = ``eigenvalue_damping``; M(g, m) = A_g·g + A_m·m the base's Newton-momentum function
        (sgd (1,0), momentum (1,β), nesterov (1+β,β²), adam (1−β₁,β₁)); Base the base optimizer's
        displacement. At each refresh: η_j = |1/(λ_j + σ_d)|, c = clip(|λ_max|/|λ_(k)|, 1, c_max).
        Each step, with Ḡ the gradient averaged over ranks::

            g₁ = Vᵀ(V Ḡ),   g₂ = Ḡ − g₁
            m  ← M(g₁, m),  d = Vᵀ(η ⊙ (V m))
            u  = Base(g₂),  u ← u − Vᵀ(V u)
            θ  ← θ + c·u − α·d

        Before the first refresh V = 0, η = 0, c = 1, so DHO2 is exactly the base optimizer.
        Refresh trigger: before update t iff t+1 ≥ W and (t+1−W) mod T = 0 (W = ``warmup``,
        T = ``refresh_every``). A step whose averaged gradient or base step holds NaN/Inf
        changes nothing (see ``nonfinite``). References: Sivan et al., "FOSI: Hybrid First and
        Second Order Optimization", ICLR 2024, arXiv 2302.08484, §3; Gu et al., "DHO2",
        arXiv 2505.00982.

    Cost of a step (K = k+ℓ, n parameters; :mod:`dho2_tf.hybrid` has the derivation): the
    Newton momentum and the heavy-ball buffer are kept in the basis of V between refreshes, so
    ``sgd``/``momentum``/``nesterov`` make two passes over V (V·Ḡ and one combine that applies
    the projection of the base step and the Newton step together) and Adam four (V·Ḡ, g₂, V·u,
    the combine); Adam updates its slots with TF's fused kernel (from 2¹⁶ entries per rank).
    Add a few element-wise passes over n (flattening Ḡ, the finiteness check, one
    ``assign_add`` per variable: the weights are updated in place) and the mode's collectives.
    In ``model.fit`` the :class:`CurvatureRefresh` hooks read no variable between refreshes.

    Note:
        The curvature refresh needs the model, the loss and a curvature batch. With ``fit``, pass
        ``callbacks=[dho2_tf.CurvatureRefresh(batch=(x, y))]``; in a custom loop call
        :meth:`bind` once, :meth:`on_step_begin` before and :meth:`on_step_end` after each
        ``apply_gradients``, and :meth:`on_train_end` at the end. Without either, every rank
        logs a warning when the first refresh is due (and DHO2 stays its base optimizer). Weight
        decay must go into the loss (as L2), so the curvature estimate sees the optimised
        function; ``weight_decay`` is therefore rejected. Adam runs in-house on the flat vector
        with ε outside √v̂, as in FOSI (Keras' Adam adds ε to √v).

    Args:
        learning_rate: base learning rate, a float or a ``LearningRateSchedule``.
            Defaults to 1e-3.
        base: base optimizer, one of ``"sgd"``, ``"momentum"``, ``"nesterov"``, ``"adam"``.
            Defaults to ``"adam"``.
        k: number of largest eigenpairs. Defaults to 10.
        ell: number of smallest eigenpairs. Defaults to 0.
        alpha: Newton step size α ≥ 0. Defaults to 0.1.
        c_max: clip of the base learning-rate scale c (≥ 1). Defaults to 1 for Adam, else 3.
        lanczos_order: Lanczos iterations m ≥ k+ℓ. Defaults to 4(k+ℓ).
        lanczos_dtype: ``"float32"``, ``"float64"`` or ``None`` (default: the model's own
            precision, float64 for float64 models, else float32): storage and arithmetic of
            the Lanczos basis (its coefficients and T are always float64). A float32 basis
            halves the memory traffic of the re-orthogonalisation; its extreme Ritz values
            agree with a float64 basis to about 1e-5 of |λ_max| (measured in BENCHMARKS.md).
        refresh_every: curvature refresh interval T in steps (> 0). Defaults to 100.
        warmup: steps W before the first refresh (≥ 0). Defaults to ``refresh_every``.
        eigenvalue_damping: σ_d ≥ 0 added to λ before inverting. Defaults to 0.
        momentum: β of the ``momentum``/``nesterov`` bases. Defaults to 0.9.
        beta_1: β₁ of Adam. Defaults to 0.9.
        beta_2: β₂ of Adam. Defaults to 0.999.
        epsilon: ε of Adam. Defaults to 1e-8.
        mode: distribution mode (:mod:`dho2_tf.modes`). ``"sharded"`` and ``"replicated"``
            are both exactly single-process FOSI on the union of the ranks' batches; they
            differ in layout:

            * ``"replicated"``: V, momentum and base slots in full on every rank,
              (slots+1+K)·n numbers per rank. One allreduce (mean) of the gradient per step,
              like a data-parallel Keras optimizer; every rank then computes the same full
              step locally. The fastest layout when the state fits.
            * ``"sharded"``: the same state cut 1/P, (slots+1+K)·n/P numbers per rank.
              Dependent collectives per step: reduce-scatter of Ḡ (n), allreduce of V_r Ḡ_r
              (K), for Adam an allreduce of V_r u_r (K), all-gather of δ (n): three or four
              latency-bound collectives. Choose it when the replicated state would not fit a
              rank's memory.
            * ``"auto"`` (default): resolved at ``build`` to ``"replicated"`` when
              (slots+1+K)·n·itemsize + m·n·8 bytes (m = ``lanczos_order``; the Lanczos basis
              is float64) fit ``memory_budget``, else ``"sharded"``. The choice does not
              depend on P, is logged once (rank 0) and is :attr:`resolved_mode`.
            * ``"faithful"``: the released DHO2 code's design (replicated, rank 0's HVP, window
              rule).
            * ``"pipelined"``: curvature ranks compute while update ranks train (``sharded``
              within the update ranks).
            * ``"admm"``: consensus ADMM with τ local steps between allreduces.
        memory_budget: bytes of replicated state per rank ``mode="auto"`` may use (> 0).
            Defaults to 1 GiB. Ignored by the other modes.
        window_rule: ``"extrapolate"`` (the released window rule, ``faithful`` only) or
            ``"none"``. Defaults to ``"extrapolate"`` for ``faithful``, else ``"none"``.
        window_sigma: σ_w of the window rule's gradient offset. Defaults to 5e-9.
        curvature_ranks: ``pipelined``: size P_C of the curvature set (the last ranks).
            Defaults to 1.
        update_ranks: ``pipelined``: size P_U of the update set; must equal world − P_C.
            Defaults to world − P_C.
        delivery_delay: ``pipelined``: steps Δ between a trigger and the delivery of its
            eigenpairs, 1 ≤ Δ ≤ ``refresh_every``. Defaults to ⌈refresh_every/2⌉.
        rho: ``admm``: penalty ρ > 0. Defaults to 1e-2.
        tau: ``admm``: local steps τ ≥ 1 between consensus rounds. Defaults to 8.
        x_restart: ``admm``: after a round, ``"keep"`` the local iterate x (textbook ADMM) or
            restart it from ``"z"`` (local steps with periodic averaging plus duals; far more
            robust with stochastic gradients on non-convex losses, see BENCHMARKS.md). Defaults
            to ``"z"``.
        nonfinite: what a step whose averaged gradient or base step holds NaN/Inf does:
            ``"skip"`` (weights, slots and momentum stay unchanged, the bound model's
            non-trainable statistics are restored inside the step, ``skipped_steps`` counts it;
            every rank decides from the same full displacement, so all agree; a displacement
            so large that its sum overflows counts as non-finite too) or ``"raise"`` (stop
            with an error). Skipped steps are logged (rank 0) and counted on every model. A
            non-finite curvature estimate always keeps the previous eigenpairs.
        max_consecutive_skips: with ``nonfinite="skip"``, the number of consecutive skipped
            steps (≥ 1) that is still tolerated: one more stops training with an error on
            every rank (the run has diverged or its data is broken). Defaults to 50.
        seed: seed of the Lanczos start vectors (refresh j uses ``seed + j``). Defaults to 0.
        comm: communicator (not serialised). Defaults to Horovod under ``horovodrun``, else local.
        name: optimizer name. Defaults to ``"DHO2"``.
        **kwargs: the Keras base-optimizer arguments (``clipnorm``, ``clipvalue``,
            ``global_clipnorm``, ``jit_compile``).
    """

    def __init__(self, learning_rate: float | Any = 1e-3, base: str = "adam", k: int = 10,
                 ell: int = 0, alpha: float = 0.1, c_max: float | None = None,
                 lanczos_order: int | None = None, lanczos_dtype: str | None = None,
                 refresh_every: int = 100,
                 warmup: int | None = None, eigenvalue_damping: float = 0.0,
                 momentum: float = 0.9, beta_1: float = 0.9, beta_2: float = 0.999,
                 epsilon: float = 1e-8, mode: str = "auto", window_rule: str | None = None,
                 window_sigma: float = 5e-9, curvature_ranks: int = 1,
                 update_ranks: int | None = None, delivery_delay: int | None = None,
                 rho: float = 1e-2, tau: int = 8, x_restart: str = "z",
                 nonfinite: str = "skip", max_consecutive_skips: int = 50, seed: int = 0,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 comm: Communicator | None = None, name: str = "DHO2", **kwargs: Any) -> None:
        for key in ("weight_decay", "use_ema"):
            if kwargs.pop(key, None):
                raise ValueError(f"`{key}` is not supported by DHO2" + (
                    ": add an L2 term to the loss so the curvature estimate sees it"
                    if key == "weight_decay" else "") + ".")
        super().__init__(name=name, **kwargs)
        self.rule = BaseRule(base, momentum=momentum, beta_1=beta_1, beta_2=beta_2,
                             epsilon=epsilon)
        self.k = check_int("k", k, minimum=1)
        self.ell = check_int("ell", ell, minimum=0)
        self.alpha = check_real("alpha", alpha, minimum=0.0)
        self.c_max = self.rule.default_c_max if c_max is None else \
            check_real("c_max", c_max, minimum=1.0)
        self.lanczos_order = 4 * (self.k + self.ell) if lanczos_order is None else check_int(
            "lanczos_order", lanczos_order, minimum=self.k + self.ell,
            hint="it must be at least k + ell")
        if lanczos_dtype not in (None, "float32", "float64"):
            raise ValueError("`lanczos_dtype` must be None, 'float32' or 'float64'. "
                             f"Received: lanczos_dtype={lanczos_dtype!r}")
        self.lanczos_dtype = lanczos_dtype
        self.refresh_every = check_int("refresh_every", refresh_every, minimum=1)
        self.warmup = self.refresh_every if warmup is None else check_int("warmup", warmup,
                                                                           minimum=0)
        self.eigenvalue_damping = check_real("eigenvalue_damping", eigenvalue_damping,
                                             minimum=0.0)
        if mode not in MODE_CHOICES:
            raise ValueError(f"`mode` must be one of {MODE_CHOICES}. Received: mode={mode!r}")
        self.mode = mode
        self.memory_budget = check_int("memory_budget", memory_budget, minimum=1)
        self.window_rule = ("extrapolate" if mode == "faithful" else "none") \
            if window_rule is None else window_rule
        if self.window_rule not in ("none", "extrapolate") or (
                self.window_rule == "extrapolate" and mode != "faithful"):
            raise ValueError("`window_rule` must be 'none', or 'extrapolate' with "
                             f"mode='faithful'. Received: window_rule={window_rule!r}, "
                             f"mode={mode!r}")
        self.window_sigma = check_real("window_sigma", window_sigma, minimum=0.0)
        self.curvature_ranks = check_int("curvature_ranks", curvature_ranks, minimum=1)
        self.update_ranks = None if update_ranks is None else check_int(
            "update_ranks", update_ranks, minimum=1)
        self.delivery_delay = -(-self.refresh_every // 2) if delivery_delay is None else \
            check_int("delivery_delay", delivery_delay, minimum=1, maximum=self.refresh_every)
        self.rho = check_real("rho", rho, minimum=0.0, open_min=True)
        self.tau = check_int("tau", tau, minimum=1)
        if x_restart not in ("keep", "z"):
            raise ValueError(
                f"`x_restart` must be 'keep' or 'z'. Received: x_restart={x_restart!r}")
        self.x_restart = x_restart
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"`nonfinite` must be one of {NONFINITE_POLICIES}. "
                             f"Received: nonfinite={nonfinite!r}")
        self.nonfinite = nonfinite
        self.max_consecutive_skips = check_int("max_consecutive_skips", max_consecutive_skips,
                                               minimum=1)
        self.seed = check_int("seed", seed, minimum=0)
        if isinstance(learning_rate, (numbers.Real, str)):  # schedules and tensors pass through
            check_real("learning_rate", learning_rate, minimum=0.0)
        self._learning_rate = self._build_learning_rate(learning_rate)
        self._comm = comm
        # "auto" is resolved in build(); until then its layout behaves as "sharded" (neither
        # constrains the world nor uses process sets).
        self._mode = make_mode("sharded" if mode == "auto" else mode, self)
        if comm is not None:
            self._mode.validate_world()
        self.binding: dict[str, Any] | None = None
        self.last_refresh: dict[str, Any] | None = None
        self.triggers: list[int] = []
        self._host = HostState()
        self._stat_shadows: StatShadows | None = None

    # ----------------------------------------------------------------------------------- state
    @property
    def comm(self) -> Communicator:
        """The communicator (resolved on first use; pipelined mode registers its sets)."""
        if self._comm is None:
            sets = self._mode.required_process_sets() if self.mode == "pipelined" else ()
            self._comm = default_comm(process_sets=sets)
        return self._comm

    @property
    def num_pairs(self) -> int:
        """K = k + ℓ."""
        return self.k + self.ell

    @property
    def resolved_mode(self) -> str | None:
        """The layout in use: ``mode``, or for ``mode="auto"`` the one chosen at ``build``
        (``None`` before). Checkpoints and exported states record this one."""
        if self.mode == "auto" and not getattr(self, "_built", False):
            return None
        return self._mode.name

    @property
    def distribution(self) -> Any:
        """The distribution mode object (:mod:`dho2_tf.modes`) and its capabilities, e.g.
        ``state_is_rank_local``, ``checkpointable``, ``can_import(mode)``."""
        return self._mode

    @property
    def is_curvature_rank(self) -> bool:
        """True on the ranks of a pipelined run that compute curvature instead of training."""
        return self.mode == "pipelined" and self._mode.is_curvature_rank

    def build(self, var_list: list[tf.Variable]) -> None:
        """Create the flat state in the mode's layout: base slots, momentum, curvature."""
        super().build(var_list)
        if getattr(self, "_built", False):
            return
        self.spec = FlatSpec.of(var_list)
        if self.mode == "auto":
            self._mode = make_mode(self._choose_layout(self.spec.n, var_list[0].dtype), self)
        self._mode.validate_world()
        self._built = True
        self.model_variables = list(var_list)
        self.layout = self._mode.layout(self.spec.n)
        # Pipelined curvature ranks never update weights: they keep no parameter-sized state.
        s = 0 if self.is_curvature_rank else self.layout.shard_size
        kk = self.num_pairs
        dtype = var_list[0].dtype
        self._base_slots = [self.add_variable([s], dtype, name=f"base_{n}")
                            for n in self.rule.slot_names]
        self._newton_momentum = self.add_variable([s], dtype, name="newton_momentum")
        self._newton_coeffs = self.add_variable([kk], dtype, name="newton_coeffs")
        self._newton_decay = self.add_variable([], dtype, initializer="ones", name="newton_decay")
        self._base_coeffs = self.add_variable([kk], dtype, name="base_coeffs") \
            if self.rule.linear_buffer else None
        self._eigenvalues = self.add_variable([kk], dtype, name="eigenvalues")
        self._eigenvectors = self.add_variable([kk, s], dtype, name="eigenvectors_shard")
        self._gram = self.add_variable([kk, kk], dtype, name="gram")
        self._rates = self.add_variable([kk], dtype, name="newton_rates")
        self._scale = self.add_variable([], dtype, initializer="ones", name="lr_scale")
        self._refreshes = self.add_variable([], tf.int64, name="num_refreshes")
        self._skipped = self.add_variable([], tf.int64, name="skipped_steps")
        self._sharded_ids = {id(v) for v in [*self._base_slots, self._newton_momentum,
                                             self._eigenvectors]} if self._mode.shards_state \
            else set()
        self._mode.build(var_list)
        self._in_place = self.rule.updates_in_place and s >= IN_PLACE_MIN_SIZE
        self._workspace = Workspace(self.rule, kk, s, dtype, self._in_place)
        logger.debug("DHO2 built: mode=%s n=%d %r", self.resolved_mode, self.spec.n, self.layout)

    def replicated_state_bytes(self, n: int, dtype: tf.DType = tf.float32) -> int:
        """Bytes per rank of the ``replicated`` layout for n parameters (see ``mode="auto"``)."""
        return replicated_state_bytes(n, len(self.rule.slot_names), self.num_pairs,
                                      self.lanczos_order, tf.as_dtype(dtype).size)

    def _choose_layout(self, n: int, dtype: tf.DType) -> str:
        """``mode="auto"``: "replicated" if its state fits ``memory_budget``, else "sharded"."""
        needed = self.replicated_state_bytes(n, dtype)
        chosen = choose_layout(needed, self.memory_budget)
        if self.comm.is_root:
            logger.info("DHO2 mode='auto' chose %r: replicated state %.1f MiB per rank "
                        "(n=%d, K=%d, %d base slots, Lanczos basis %d rows in float64) %s "
                        "memory_budget %.1f MiB", chosen, needed / 2**20, n, self.num_pairs,
                        len(self.rule.slot_names), self.lanczos_order,
                        "<=" if chosen == "replicated" else ">", self.memory_budget / 2**20)
        return chosen

    def state_bytes(self) -> int:
        """Bytes of this rank's optimizer and curvature state (all variables but counters)."""
        skip = {id(self.iterations), id(self._skipped)}
        return int(sum(v.shape.num_elements() * v.dtype.size for v in self.variables
                       if id(v) not in skip))

    def curvature_metrics(self) -> dict[str, float]:
        """Scalars worth monitoring: eigenvalue_j, lr_scale, refreshes, refresh_seconds, mode's."""
        if not getattr(self, "_built", False):
            return {}
        out = {f"eigenvalue_{j}": float(v) for j, v in enumerate(self._eigenvalues.numpy())}
        out["lr_scale"] = float(self._scale.numpy())
        out["refreshes"] = float(self._refreshes.numpy())
        out["skipped_steps"] = float(self._skipped.numpy())
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

    def _check_curvature_source(self) -> None:
        """In a step traced before :meth:`bind`: when the first refresh is due (and on every
        later step until it ran once), call :meth:`_no_curvature_source` eagerly on every rank.

        Only steps traced with no binding carry this check (a cond on two scalars).
        """
        due = hybrid.next_refresh_step(0, self.warmup, self.refresh_every)
        checked = self._workspace.source_checked
        pending = tf.logical_and(self.iterations >= due, tf.logical_not(checked))

        def check() -> None:
            tf.py_function(self._no_curvature_source, [], [])
            checked.assign(True)

        tf.cond(pending, check, lambda: None)

    def _no_curvature_source(self) -> None:
        """Warn (once, every rank) that no curvature source is bound, and run the rank check.

        Without :class:`CurvatureRefresh` or :meth:`bind` no refresh ever runs and DHO2 is
        exactly its base optimizer; the rank check (:meth:`verify_consistency`) the
        ``CurvatureRefresh`` path runs at the start runs here instead.
        """
        if self.binding is not None or self._host.source_warned:
            return
        self._host.source_warned = True
        logger.warning(
            "DHO2 step %d: a curvature refresh is due but no curvature source is bound, so "
            "DHO2 trains as its plain base optimizer (%r) with no second-order step. Pass "
            "callbacks=[dho2_tf.CurvatureRefresh(batch=(x, y))] to fit(), or call "
            "optimizer.bind(model, loss, (x, y)) and the step hooks in a custom loop.",
            hybrid.next_refresh_step(0, self.warmup, self.refresh_every), self.rule.name)
        if not getattr(self, "consistency_checked", False):
            view = types.SimpleNamespace(trainable_variables=list(self.model_variables),
                                         name="model")
            self.verify_consistency(view)

    def apply_fosi_step(self, g_r: tf.Tensor, variables: list[tf.Variable],
                        gather: Callable[[tf.Tensor], tf.Tensor] | None = None) -> None:
        """One FOSI step from this rank's averaged-gradient shard; see the class ``Math:``.

        Math: δ_r from :func:`dho2_tf.hybrid.hybrid_displacement` (with the new momentum
        coefficients and base slots); δ = gather(δ_r), the full displacement [n] (the mode's
        all-gather, or δ_r itself when the state is full); then, iff Σδ is finite (no entry of
        δ is NaN/Inf and the step is not so large that its sum overflows), θ ← θ + δ (one
        ``assign_add`` per variable) and the momentum and the slots take their new values.
        Every rank holds the same δ, so all take the same branch. Otherwise
        nothing changes: the bound model's non-trainable statistics (updated by the forward
        pass) are restored from their copies and ``skipped_steps`` grows by one. Adam updates
        its slots in place (one fused pass) once every rank knows Ḡ is finite, so only a base
        step that overflows with a finite gradient would keep its slot update.

        Args:
            g_r: float [s], the rank-averaged gradient on this rank's state shard.
            variables: the model variables, in the flat order.
            gather: maps δ_r [s] to δ [n]; ``None`` when s = n.
        """
        comm, group = self._mode.projection_comm()
        ws, rule, step = self._workspace, self.rule, self.iterations + 1
        curvature = hybrid.Curvature(self._eigenvectors, self._gram, self._rates, self._scale)
        slot_coeffs = self._base_coeffs if self._base_coeffs is not None else \
            tf.zeros([self.num_pairs], g_r.dtype)
        state = hybrid.StepState(
            self._newton_momentum, self._newton_coeffs, self._newton_decay,
            [] if self._in_place else [v.value() for v in self._base_slots],
            slot_coeffs, ws.projected, tf.equal(ws.projected_at, self._refreshes))
        in_place = None
        if self._in_place:
            def in_place(g2: tf.Tensor, lr: tf.Tensor) -> tf.Tensor:
                return rule.apply_in_place(ws.base_out, self._base_slots, g2, lr, step)

        result = hybrid.hybrid_displacement(
            g_r, state, curvature, rule, self.learning_rate, self.alpha, step, comm,
            in_place=in_place, process_set=group)
        delta = result.delta_r if gather is None else gather(result.delta_r)
        finite = hybrid.sum_finite(delta)
        if self.nonfinite == "raise":
            tf.debugging.assert_equal(finite, True, message=(
                "DHO2: the averaged gradient (or the base step) holds NaN/Inf at this step; "
                "stopping because nonfinite='raise'. Check the input batch and learning rate."))
        shadows = self._stat_shadows
        bound = self.binding["model"] if self.binding else None
        stats = shadows.pairs if shadows is not None and shadows.model is bound else []
        refreshes = self._refreshes.value()

        def commit() -> None:
            assign_add_flat(variables, delta, self.spec)
            self._newton_coeffs.assign(result.momentum_coeffs)
            self._newton_decay.assign(result.momentum_decay)
            if self._base_coeffs is not None:
                self._base_coeffs.assign(result.slot_coeffs)
            ws.projected.assign(result.cached)
            ws.projected_at.assign(refreshes)
            for slot, value in zip(self._base_slots, result.slots_r):
                slot.assign(value)
            for stat, shadow in stats:
                shadow.assign(stat)

        def skip() -> None:
            for stat, shadow in stats:
                stat.assign(shadow)
            skipped = self._skipped.assign_add(1)
            run = ws.consecutive_skips.assign_add(1)
            tf.py_function(self._log_skipped_step, [step, skipped], [])
            tf.debugging.assert_less_equal(run, tf.constant(self.max_consecutive_skips, tf.int64),
                                           message=self._too_many_skips_message())

        def reset_run() -> None:
            commit()
            ws.consecutive_skips.assign(0)

        tf.cond(finite, reset_run, skip)

    def materialize_momentum(self) -> None:
        """Fold the K coordinates into the vectors: m₀ ← Vᵀc + d·m₀, c ← 0, d ← 1, and for
        ``momentum``/``nesterov`` B ← B − Vᵀq, q ← 0 (the same state, free of the current V).

        Eager and local (c and q are replicated, so no collective). Runs before every change
        of V (:meth:`refresh_curvature` calls it through the mode's estimate, the pipelined
        delivery before installing). Exported states keep the coordinates as they are (with V),
        so a resumed run continues bit for bit.
        """
        if not getattr(self, "_built", False):
            return
        v = self._eigenvectors
        self._newton_momentum.assign(hybrid.materialize(
            self._newton_momentum, self._newton_coeffs, v, self._newton_decay))
        self._newton_coeffs.assign(tf.zeros_like(self._newton_coeffs))
        self._newton_decay.assign(tf.ones_like(self._newton_decay))
        if self._base_coeffs is not None:
            buffer = self._base_slots[0]
            buffer.assign(hybrid.materialize(buffer, -self._base_coeffs, v))
            self._base_coeffs.assign(tf.zeros_like(self._base_coeffs))
        self._workspace.projected_at.assign(-1)

    def ensure_stat_shadows(self) -> bool:
        """Create the copies of the bound model's non-trainable variables that a skipped step
        restores (eager; a no-op while the bound model is unchanged).

        Steps traced before the copies existed do not restore statistics, so call it after
        :meth:`bind` and before the first step (``CurvatureRefresh`` and :meth:`on_step_begin`
        do). Returns whether copies were created now.
        """
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
        """Give the optimizer what a curvature refresh needs (and build it for ``model``).

        Args:
            model: the model being trained (its ``trainable_variables`` are the optimised ones).
            loss: ``loss(y_true, y_pred)``, a Keras loss name, or ``None`` for ``model.loss``.
            batch: ``(x, y)`` curvature batch of this rank (kept fixed across refreshes).
            training: run the model in training mode during HVPs (batch-norm batch statistics;
                moving statistics are restored after each HVP).
        """
        from dho2_tf.curvature.hvp import make_hvp_fn

        loss_fn = resolve_loss(model, loss)
        self.build(model.trainable_variables)
        source = model.compiled_loss if loss is None else loss
        key = (id(model), id(source), tuple(id(part) for part in batch), training)
        if self.binding is not None and self.binding.get("key") == key:
            return  # the same binding (e.g. a second fit call): keep the compiled graphs
        dtype = model.trainable_variables[0].dtype
        hvp = make_hvp_fn(model, loss_fn, batch, training=training, hvp_dtype=dtype)
        estimator = self._mode.make_estimator(hvp, dtype, self.basis_dtype_for(dtype))
        self.binding = {"model": model, "dtype": dtype, "hvp": hvp, "estimator": estimator,
                        "key": key, "batch": batch}
        # Compile the HVP and the Lanczos loop now (no HVP runs, no collective), so the first
        # refresh costs what later ones do and the one-off cost is reported on its own.
        self.compile_seconds = 0.0 if estimator is None else estimator.trace()
        if self.comm.is_root and estimator is not None:
            logger.info("DHO2 compiled the curvature graphs in %.2fs (n=%d, m=%d, %s %s basis)",
                        self.compile_seconds, self.spec.n, self.lanczos_order,
                        estimator.basis_layout, self.basis_dtype_for(dtype))

    def basis_dtype_for(self, model_dtype: tf.DType) -> str:
        """The Lanczos basis dtype: ``lanczos_dtype``, or the model's precision when None."""
        if self.lanczos_dtype is not None:
            return self.lanczos_dtype
        return "float64" if tf.as_dtype(model_dtype) == tf.float64 else "float32"

    def on_step_begin(self, iterations: int | None = None) -> None:
        """Call before every update (eager): curvature refresh, window jump, pipeline hand-over.

        Args:
            iterations: the step count before this update, when the caller keeps it as a
                Python int (``CurvatureRefresh`` does): then a step with nothing due reads no
                variable. ``None`` reads the step and refresh counters from their variables.
        """
        if iterations is None:
            iterations = int(self.iterations.numpy())
            self._host.refreshes = None
            self.ensure_stat_shadows()
        self._host.begun_at = iterations
        self._mode.on_step_begin(iterations)

    def on_step_end(self, iterations: int | None = None) -> None:
        """Call after every update (eager): ADMM rounds.

        Args:
            iterations: the step count after the update, as for :meth:`on_step_begin`. ``None``
                takes one more than the count :meth:`on_step_begin` saw (one update in
                between), and logs a warning when steps were skipped since the last report.
        """
        if iterations is None:
            begun = self._host.begun_at
            iterations = int(self.iterations.numpy()) if begun is None else begun + 1
            self._host.begun_at = None
            self.report_skipped()
        self._mode.on_step_end(iterations)

    def sync_host_state(self) -> int:
        """Re-read what the eager hooks keep in Python and copy the statistics (eager).

        Call after the optimizer's or the model's variables were changed outside a training
        step (restored, averaged); ``CurvatureRefresh`` calls it at the start of every epoch.

        Returns:
            The optimizer's step count.
        """
        self._host.refreshes = None
        self._mode.sync_host_state()
        if not self.ensure_stat_shadows():
            self.sync_stat_shadows()
        return int(self.iterations.numpy())

    def set_weights(self, weights: list[Any]) -> None:
        """Keras' ``set_weights`` (values in the order of ``variables``), then forget every
        cache derived from the old values (the projected state, the host copies)."""
        super().set_weights(weights)
        self._workspace.projected_at.assign(-1)
        self._host.refreshes = None
        self._mode.sync_host_state()

    def sync_stat_shadows(self) -> None:
        """Copy the bound model's non-trainable statistics into the copies a skipped step
        restores (after they were changed outside a step, e.g. averaged over ranks)."""
        if self._stat_shadows is not None:
            self._stat_shadows.sync()

    def _too_many_skips_message(self) -> str:
        return (f"DHO2 skipped more than max_consecutive_skips={self.max_consecutive_skips} "
                "consecutive steps: the averaged gradient (or the base step) keeps holding "
                "NaN/Inf, so training stops instead of leaving the weights frozen. Check the "
                "inputs and labels for NaN/Inf and lower the learning rate; raise "
                "`max_consecutive_skips` if such runs are expected.")

    def _log_skipped_step(self, step: tf.Tensor, skipped: tf.Tensor) -> None:
        """Log one skipped step on rank 0 (called from the step graph)."""
        total = int(skipped.numpy())
        if self.comm.is_root:
            logger.warning("DHO2 skipped step %d: the averaged gradient or base step holds "
                           "NaN/Inf (%d skipped so far)", int(step.numpy()), total)
        self._host.skipped_reported = max(self._host.skipped_reported, total)

    def report_skipped(self) -> int:
        """Log a warning if steps were skipped since the last report; returns the count."""
        if not getattr(self, "_built", False):
            return 0
        skipped = int(self._skipped.numpy())
        if skipped > self._host.skipped_reported and self.comm.is_root:
            logger.warning("DHO2 skipped %d step(s) with a non-finite gradient or base step "
                           "(%d so far)", skipped - self._host.skipped_reported, skipped)
        self._host.skipped_reported = skipped
        return skipped

    def verify_consistency(self, model: tf.keras.Model) -> None:
        """Compare configuration, mode, world size and variable shapes/dtypes across ranks.

        Every rank must call it (one ``allgather_object``); a mismatch raises the same
        :class:`dho2_tf.consistency.RunConsistencyError` (a ValueError) on every rank, naming
        each differing key (``optimizer.k``, ``variable[0]``, ...) with each rank's value,
        instead of leaving a later collective hanging.
        """
        from dho2_tf.consistency import check_run_consistency, flatten

        config = {k: v for k, v in self.get_config().items() if k != "name"}
        fingerprint = flatten(config, "optimizer.")
        fingerprint.update({"mode": self.resolved_mode, "world_size": self.comm.size,
                            "num_trainable_variables": len(model.trainable_variables)})
        fingerprint.update({f"variable[{i}]": [list(v.shape), v.dtype.name]
                            for i, v in enumerate(model.trainable_variables)})
        self.consistency_checked = True
        check_run_consistency(self.comm, fingerprint, what="DHO2")

    def on_train_end(self) -> None:
        """Call once when training stops (pipelined: releases the curvature ranks)."""
        self._mode.on_train_end()
        self.report_skipped()

    def serve_curvature(self) -> list[dict[str, Any]]:
        """Pipelined mode, curvature ranks: serve refreshes until the update ranks stop.

        Call after :meth:`bind` instead of training, once per training session of the update
        ranks (each ``fit()``, ending with :meth:`on_train_end`); returns one record per refresh
        served (``round``, ``refresh``, ``start``, ``end``, ``seconds``, ``status``).
        """
        if not self.is_curvature_rank:
            raise RuntimeError("serve_curvature() runs only on the curvature ranks of "
                               "mode='pipelined'; update ranks train with fit().")
        self._require_binding()
        if not getattr(self, "consistency_checked", False):  # as the update ranks' first step
            self.verify_consistency(self.binding["model"])
        return self._mode.serve()

    def export_state(self) -> dict[str, Any]:
        """This rank's optimizer state with sharded vectors gathered to full length.

        Vectors kept in the basis of V are exported as they are: the Newton momentum as
        ``newton_momentum`` (m₀), ``newton_coeffs`` (c) and ``newton_decay`` (d), a heavy-ball
        buffer as its vector B and ``base_coeffs`` (q); V is part of the state.

        The result does not depend on the number of ranks (except for ``admm``, whose state is
        rank-local), nor on the layout for ``sharded`` and ``replicated``, so
        :meth:`import_state` can re-partition it for another world size or layout. ``__mode__``
        is the resolved mode. Collective: every rank holding state must call it.
        """
        from dho2_tf.curvature.spectrum import gather_vectors

        comm, group, n = self.comm, self._mode.group, self.spec.n
        out: dict[str, Any] = {"__world_size__": comm.size, "__mode__": self.resolved_mode}
        for i, var in enumerate(self.variables):
            value = var.value()
            if id(var) in self._sharded_ids:
                rows = value if len(value.shape) == 2 else value[None, :]
                full = gather_vectors(rows, n, comm, process_set=group,
                                      name=f"dho2/export/{i}")
                value = full if len(value.shape) == 2 else full[0]
            out[var.name] = value.numpy()
        return out

    def import_state(self, state: dict[str, Any]) -> None:
        """Load :meth:`export_state` output into this (built) optimizer, re-sharding as needed.

        A ``sharded`` state loads into ``replicated`` and back (both export full-length vectors).

        Raises:
            ValueError: on a mode mismatch, or an ``admm`` state from another world size.
        """
        if not self._mode.can_import(state.get("__mode__")):
            raise ValueError(f"Checkpoint state is for mode={state.get('__mode__')!r}, this "
                             f"optimizer has mode={self.resolved_mode!r}.")
        self._mode.check_import_world(state.get("__world_size__"))
        layout = self.layout
        # States written before the momentum was kept as m = Vᵀc + d·m₀ hold m itself.
        defaults = {self._newton_coeffs.name: tf.zeros_like(self._newton_coeffs),
                    self._newton_decay.name: tf.ones_like(self._newton_decay)}
        if self._base_coeffs is not None:
            defaults[self._base_coeffs.name] = tf.zeros_like(self._base_coeffs)
        for var in self.variables:
            if var.name not in state and var.name not in defaults:
                raise ValueError(f"Checkpoint state lacks optimizer variable {var.name!r}.")
            value = tf.convert_to_tensor(state.get(var.name, defaults.get(var.name)), var.dtype)
            if id(var) in self._sharded_ids:
                rows = value if len(value.shape) == 2 else value[None, :]
                padded = tf.pad(rows, [[0, 0], [0, layout.padded_size - layout.n]])
                value = padded[:, layout.start:layout.stop]
                value = value if len(var.shape) == 2 else value[0]
            var.assign(value)
        self._workspace.projected_at.assign(-1)
        self._host.refreshes = None
        self._mode.sync_host_state()

    @contextlib.contextmanager
    def evaluation_weights(self) -> Iterator[None]:
        """Context in which the model holds the weights to evaluate (ADMM: the consensus z)."""
        with self._mode.evaluation_weights() if getattr(self, "_built", False) \
                else contextlib.nullcontext():
            yield

    def refresh_index(self) -> int:
        """Number of refreshes done so far (also the next refresh's seed offset)."""
        return int(self._refreshes.numpy())

    def refresh_due(self, iterations: int | None = None) -> bool:
        """Whether the schedule asks for a refresh before update ``iterations`` (default: the
        next one, read from the variable).

        With ``iterations`` given, this compares it with the first step at which the next
        refresh is due (:func:`dho2_tf.hybrid.next_refresh_step`) using a Python copy of the
        refresh counter, so it reads no variable between refreshes.
        """
        if not getattr(self, "_built", False):
            return False
        if iterations is None:
            iterations = int(self.iterations.numpy())
            self._host.refreshes = None
        if self._host.refreshes is None:
            self._host.refreshes = self.refresh_index()
        return iterations >= hybrid.next_refresh_step(self._host.refreshes, self.warmup,
                                                      self.refresh_every)

    def record_trigger(self, step: int) -> None:
        """Pipelined mode: remember the step at which weights were handed over."""
        self.triggers.append(step)

    def _require_binding(self) -> None:
        if self.binding is None:
            raise RuntimeError("DHO2 needs a model, loss and batch for curvature: call "
                               "optimizer.bind(model, loss, (x, y)) first, or pass "
                               "dho2_tf.CurvatureRefresh(batch=(x, y)) to fit().")

    def refresh_curvature(self) -> dict[str, Any]:
        """Estimate the extreme eigenpairs at the current weights and install them (eager).

        Every rank must call this at the same step. A failed estimate (non-finite values)
        keeps the previous eigenpairs and is reported in the returned dict and the log.

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
            logger.warning("DHO2 curvature refresh %d kept the previous eigenpairs: %s",
                           self.refresh_index(), est.status)
            self.count_refresh(installed=False, status=est.status, start=start)
        return self.last_refresh

    def install_curvature(self, eigenvalues: tf.Tensor, vectors: tf.Tensor, gram: tf.Tensor,
                          status: str, start: float | None = None) -> None:
        """Install (λ, V in the state layout, Γ) and derive η and c (see ``Math:``)."""
        dtype = self._eigenvalues.dtype
        eigenvalues = tf.cast(eigenvalues, dtype)
        gram = tf.cast(gram, dtype)
        valid = tf.linalg.diag_part(gram) > 0.5
        rates, scale = hybrid.newton_rates(
            eigenvalues + tf.cast(self._mode.eigenvalue_shift(), dtype), valid,
            self.eigenvalue_damping, self.ell, self.c_max)
        self._eigenvalues.assign(eigenvalues)
        self._eigenvectors.assign(tf.cast(vectors, dtype))
        self._gram.assign(gram)
        self._rates.assign(rates)
        self._scale.assign(scale)
        self.count_refresh(installed=True, status=status, start=start)

    def count_refresh(self, installed: bool, status: str, start: float | None = None) -> None:
        """Advance the refresh counter and record what happened (logged on rank 0)."""
        index = self.refresh_index()
        self._refreshes.assign_add(1)
        self._host.refreshes = index + 1
        self.last_refresh = {"index": index, "status": status, "installed": installed,
                             "seconds": 0.0 if start is None else time.perf_counter() - start,
                             "eigenvalues": self._eigenvalues.numpy().copy(),
                             "scale": float(self._scale.numpy())}
        if self.comm.is_root:
            logger.info("DHO2 refresh %d (%.2fs, %s): eigenvalues %s, c=%.3g", index,
                        self.last_refresh["seconds"], status, self.last_refresh["eigenvalues"],
                        self.last_refresh["scale"])

    def broadcast_state(self, model: tf.keras.Model, root: int = 0) -> None:
        """At a fresh start (step 0), copy the model weights from rank ``root`` to the ranks
        that train, so every replica starts identical.

        Optimizer state is not broadcast: at step 0 it holds its initial values on every rank,
        and later it is sharded or rank-local (ADMM), so rank 0's copy would be wrong elsewhere.
        """
        comm, group = self.comm, self._mode.broadcast_group()
        if getattr(self, "_built", False) and int(self.iterations.numpy()) > 0:
            return
        if comm.group_size(group) == 1 or (group is not None and not group.includes(comm.rank)):
            return
        for i, var in enumerate(model.variables):
            var.assign(comm.broadcast(var.value(), root, name=f"dho2/broadcast/{i}",
                                      process_set=group))

    # -------------------------------------------------------------------------------- config
    def get_config(self) -> dict[str, Any]:
        """Every constructor argument under its own name (``comm`` excluded)."""
        config = super().get_config()
        for key in ("weight_decay", "use_ema", "ema_momentum", "ema_overwrite_frequency"):
            config.pop(key, None)
        config.update({
            "learning_rate": self._serialize_hyperparameter(self._learning_rate),
            "base": self.rule.name, "k": self.k, "ell": self.ell, "alpha": self.alpha,
            "c_max": self.c_max, "lanczos_order": self.lanczos_order,
            "lanczos_dtype": self.lanczos_dtype, "refresh_every": self.refresh_every,
            "warmup": self.warmup,
            "eigenvalue_damping": self.eigenvalue_damping, "momentum": self.rule.momentum,
            "beta_1": self.rule.beta_1, "beta_2": self.rule.beta_2,
            "epsilon": self.rule.epsilon, "mode": self.mode, "window_rule": self.window_rule,
            "window_sigma": self.window_sigma, "curvature_ranks": self.curvature_ranks,
            "update_ranks": self.update_ranks, "delivery_delay": self.delivery_delay,
            "rho": self.rho, "tau": self.tau, "x_restart": self.x_restart,
            "nonfinite": self.nonfinite, "max_consecutive_skips": self.max_consecutive_skips,
            "seed": self.seed, "memory_budget": self.memory_budget,
        })
        return config
