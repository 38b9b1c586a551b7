"""DHO2: the Keras optimizer users compile their model with."""

from __future__ import annotations

import contextlib
import logging
import numbers
import time
from typing import Any, Callable, Iterator

import tensorflow as tf

from dho2_tf import hybrid
from dho2_tf.base_rules import BaseRule
from dho2_tf.distributed.comm import Communicator, default_comm
from dho2_tf.flat import FlatSpec
from dho2_tf.modes import MODES, make_mode
from dho2_tf.validation import check_int, check_real

NONFINITE_POLICIES = ("skip", "raise")

logger = logging.getLogger(__name__)



@tf.keras.utils.register_keras_serializable(package="dho2_tf")
class DHO2(tf.keras.optimizers.Optimizer):
    r"""Distributed hybrid-order optimizer: FOSI's Newton step in span(V), a base step elsewhere.

    Every ``refresh_every`` steps (after ``warmup``) a Lanczos run estimates the k largest and ℓ
    smallest eigenpairs (λ, V) of the loss Hessian on a curvature batch; each step then takes a
    scaled Newton step in span(V) and a base-optimizer step (SGD, heavy ball, Nesterov or Adam)
    in its orthogonal complement. Gradients and Hessian-vector products are averaged over all
    ranks; the parameter-sized optimizer state (V, momentum, base slots) is sharded 1/P.

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
        T = ``refresh_every``). References: Sivan et al., "FOSI: Hybrid First and Second Order
        Optimization", ICLR 2024, arXiv 2302.08484, §3; Gu et al., "DHO2", arXiv 2505.00982;
        algorithm reference (shared/reference/dho2-algorithm.md) §3.2–3.4 and §5.2.

    Note:
        The curvature refresh needs the model, the loss and a curvature batch. With ``fit``, pass
        ``callbacks=[dho2_tf.CurvatureRefresh(batch=(x, y))]``; in a custom loop call
        :meth:`bind` once, :meth:`on_step_begin` before and :meth:`on_step_end` after each
        ``apply_gradients``, and :meth:`on_train_end` at the end. Weight
        decay must go into the loss (as L2), so the curvature estimate sees the optimised
        function; ``weight_decay`` is therefore rejected. Adam runs in-house on the flat vector
        with ε outside √v̂ (reference §4.3).

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
        refresh_every: curvature refresh interval T in steps (> 0). Defaults to 100.
        warmup: steps W before the first refresh (≥ 0). Defaults to ``refresh_every``.
        eigenvalue_damping: σ_d ≥ 0 added to λ before inverting. Defaults to 0.
        momentum: β of the ``momentum``/``nesterov`` bases. Defaults to 0.9.
        beta_1: β₁ of Adam. Defaults to 0.9.
        beta_2: β₂ of Adam. Defaults to 0.999.
        epsilon: ε of Adam. Defaults to 1e-8.
        mode: distribution mode (``shared/reference/dho2-algorithm.md`` §5): ``"sharded"``
            (default; state sharded 1/P, exactly single-process FOSI on the union of batches),
            ``"faithful"`` (the released DHO2 code's design, with its window rule),
            ``"pipelined"`` (curvature ranks compute while update ranks train), ``"admm"``
            (consensus ADMM with τ local steps between allreduces).
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
            ``"skip"`` (weights, slots and momentum stay unchanged, batch-norm statistics are
            restored, ``skipped_steps`` counts it) or ``"raise"`` (stop with an error). A
            non-finite curvature estimate always keeps the previous eigenpairs.
        seed: seed of the Lanczos start vectors (refresh j uses ``seed + j``). Defaults to 0.
        comm: communicator (not serialised). Defaults to Horovod under ``horovodrun``, else local.
        name: optimizer name. Defaults to ``"DHO2"``.
        **kwargs: the Keras base-optimizer arguments (``clipnorm``, ``clipvalue``,
            ``global_clipnorm``, ``jit_compile``).
    """

    def __init__(self, learning_rate: float | Any = 1e-3, base: str = "adam", k: int = 10,
                 ell: int = 0, alpha: float = 0.1, c_max: float | None = None,
                 lanczos_order: int | None = None, refresh_every: int = 100,
                 warmup: int | None = None, eigenvalue_damping: float = 0.0,
                 momentum: float = 0.9, beta_1: float = 0.9, beta_2: float = 0.999,
                 epsilon: float = 1e-8, mode: str = "sharded", window_rule: str | None = None,
                 window_sigma: float = 5e-9, curvature_ranks: int = 1,
                 update_ranks: int | None = None, delivery_delay: int | None = None,
                 rho: float = 1e-2, tau: int = 8, x_restart: str = "z",
                 nonfinite: str = "skip", seed: int = 0,
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
        self.refresh_every = check_int("refresh_every", refresh_every, minimum=1)
        self.warmup = self.refresh_every if warmup is None else check_int("warmup", warmup,
                                                                           minimum=0)
        self.eigenvalue_damping = check_real("eigenvalue_damping", eigenvalue_damping,
                                             minimum=0.0)
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {tuple(MODES)}. Received: mode={mode!r}")
        self.mode = mode
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
        self.seed = check_int("seed", seed, minimum=0)
        if isinstance(learning_rate, (numbers.Real, str)):  # schedules and tensors pass through
            check_real("learning_rate", learning_rate, minimum=0.0)
        self._learning_rate = self._build_learning_rate(learning_rate)
        self._comm = comm
        self._mode = make_mode(mode, self)
        if comm is not None:
            self._mode.validate_world()
        self.binding: dict[str, Any] | None = None
        self.last_refresh: dict[str, Any] | None = None
        self.triggers: list[int] = []

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
    def is_curvature_rank(self) -> bool:
        """True on the ranks of a pipelined run that compute curvature instead of training."""
        return self.mode == "pipelined" and self._mode.is_curvature_rank

    def build(self, var_list: list[tf.Variable]) -> None:
        """Create the flat state in the mode's layout: base slots, momentum, curvature."""
        super().build(var_list)
        if getattr(self, "_built", False):
            return
        self._mode.validate_world()
        self._built = True
        self.spec = FlatSpec.of(var_list)
        self.model_variables = list(var_list)
        self.layout = self._mode.layout(self.spec.n)
        # Pipelined curvature ranks never update weights: they keep no parameter-sized state.
        s = 0 if self.is_curvature_rank else self.layout.shard_size
        kk = self.num_pairs
        dtype = var_list[0].dtype
        self._base_slots = [self.add_variable([s], dtype, name=f"base_{n}")
                            for n in self.rule.slot_names]
        self._newton_momentum = self.add_variable([s], dtype, name="newton_momentum")
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
        logger.debug("DHO2 built: mode=%s n=%d %r", self.mode, self.spec.n, self.layout)

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
            self._mode.step(self._clip_gradients(grads), list(variables))
            self.iterations.assign_add(1)
        return self.iterations

    def fosi_displacement(self, g_r: tf.Tensor) -> tf.Tensor:
        """FOSI displacement of this rank's state shard for gradient shard ``g_r``; updates the
        momentum and base slots. See the class docstring (``Math:``)."""
        comm, group = self._mode.projection_comm()
        curvature = hybrid.Curvature(self._eigenvectors, self._gram, self._rates, self._scale)
        result = hybrid.hybrid_displacement(
            g_r, self._newton_momentum, [s.value() for s in self._base_slots], curvature,
            self.rule, self.learning_rate, self.alpha, self.iterations + 1, comm,
            process_set=group)
        if self.nonfinite == "raise":
            tf.debugging.assert_equal(result.finite, True, message=(
                "DHO2: the averaged gradient (or the base step) holds NaN/Inf at this step; "
                "stopping because nonfinite='raise'. Check the input batch and learning rate."))
        self._skipped.assign_add(tf.where(result.finite, tf.constant(0, tf.int64),
                                          tf.constant(1, tf.int64)))
        self._newton_momentum.assign(result.newton_momentum_r)
        for slot, value in zip(self._base_slots, result.base_slots_r):
            slot.assign(value)
        return result.delta_r

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
        dtype = model.trainable_variables[0].dtype
        self.binding = {"model": model, "dtype": dtype, "hvp": make_hvp_fn(
            model, loss_fn, batch, training=training, hvp_dtype=dtype)}

    def on_step_begin(self) -> None:
        """Call before every update (eager): curvature refresh, window jump, pipeline hand-over.

        Also snapshots the bound model's non-trainable statistics, so a skipped (non-finite)
        step can restore them in :meth:`on_step_end`.
        """
        self._mode.on_step_begin()
        model = self.binding["model"] if self.binding else None
        self._stats_snapshot = None
        if model is not None and model.non_trainable_variables and getattr(self, "_built", False):
            self._stats_snapshot = (int(self._skipped.numpy()),
                                    [v.value() for v in model.non_trainable_variables])

    def on_step_end(self) -> None:
        """Call after every update (eager): restores statistics of a skipped step; ADMM rounds."""
        snapshot = getattr(self, "_stats_snapshot", None)
        if snapshot is not None and int(self._skipped.numpy()) > snapshot[0]:
            for var, value in zip(self.binding["model"].non_trainable_variables, snapshot[1]):
                var.assign(value)
            logger.warning("DHO2 skipped a step with a non-finite gradient (%d so far)",
                           int(self._skipped.numpy()))
        self._mode.on_step_end()

    def verify_consistency(self, model: tf.keras.Model) -> None:
        """Compare configuration, mode, world size and variable shapes/dtypes across ranks.

        Every rank must call it (one ``allgather_object``); a mismatch raises the same
        ValueError on every rank instead of leaving a later collective hanging.
        """
        config = {k: v for k, v in self.get_config().items() if k != "name"}
        mine = repr((sorted(config.items()), self.comm.size,
                     [(tuple(v.shape), v.dtype.name) for v in model.trainable_variables]))
        everyone = self.comm.allgather_object(mine, name="dho2/consistency")
        self.consistency_checked = True
        differing = [r for r, fp in enumerate(everyone) if fp != everyone[0]]
        if differing:
            raise ValueError(
                f"DHO2 ranks disagree on the configuration or the model: rank(s) {differing} "
                f"differ from rank 0.\nrank 0: {everyone[0]}\nrank {differing[0]}: "
                f"{everyone[differing[0]]}")

    def on_train_end(self) -> None:
        """Call once when training stops (pipelined: releases the curvature ranks)."""
        self._mode.on_train_end()

    def serve_curvature(self) -> list[dict[str, Any]]:
        """Pipelined mode, curvature ranks: serve refreshes until the update ranks stop.

        Call after :meth:`bind` instead of training; returns one record per refresh served
        (``round``, ``start``, ``end``, ``seconds``, ``status``).
        """
        if not self.is_curvature_rank:
            raise RuntimeError("serve_curvature() runs only on the curvature ranks of "
                               "mode='pipelined'; update ranks train with fit().")
        self._require_binding()
        self.verify_consistency(self.binding["model"])
        return self._mode.serve()

    def export_state(self) -> dict[str, Any]:
        """This rank's optimizer state with sharded vectors gathered to full length.

        The result does not depend on the number of ranks (except for ``admm``, whose state is
        rank-local), so :meth:`import_state` can re-partition it for another world size.
        Collective: every rank holding state must call it.
        """
        from dho2_tf.curvature.spectrum import gather_vectors

        comm, group, n = self.comm, self._mode.group, self.spec.n
        out: dict[str, Any] = {"__world_size__": comm.size, "__mode__": self.mode}
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

        Raises:
            ValueError: on a mode mismatch, or an ``admm`` state from another world size.
        """
        if state.get("__mode__") != self.mode:
            raise ValueError(f"Checkpoint state is for mode={state.get('__mode__')!r}, this "
                             f"optimizer has mode={self.mode!r}.")
        if self.mode == "admm" and state.get("__world_size__") != self.comm.size:
            raise ValueError("admm state is rank-local and cannot be re-partitioned: resume "
                             f"with {state.get('__world_size__')} ranks.")
        layout = self.layout
        for var in self.variables:
            if var.name not in state:
                raise ValueError(f"Checkpoint state lacks optimizer variable {var.name!r}.")
            value = tf.convert_to_tensor(state[var.name], var.dtype)
            if id(var) in self._sharded_ids:
                rows = value if len(value.shape) == 2 else value[None, :]
                padded = tf.pad(rows, [[0, 0], [0, layout.padded_size - layout.n]])
                value = padded[:, layout.start:layout.stop]
                value = value if len(var.shape) == 2 else value[0]
            var.assign(value)

    @contextlib.contextmanager
    def evaluation_weights(self) -> Iterator[None]:
        """Context in which the model holds the weights to evaluate (ADMM: the consensus z)."""
        if self.mode == "admm" and getattr(self, "_built", False):
            with self._mode.consensus_weights():
                yield
        else:
            yield

    def refresh_index(self) -> int:
        """Number of refreshes done so far (also the next refresh's seed offset)."""
        return int(self._refreshes.numpy())

    def refresh_due(self) -> bool:
        """Whether the schedule asks for a refresh before the next update."""
        if not getattr(self, "_built", False):
            return False
        due = hybrid.refresh_count_due(int(self.iterations.numpy()), self.warmup,
                                       self.refresh_every)
        return due > self.refresh_index()

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
            "refresh_every": self.refresh_every, "warmup": self.warmup,
            "eigenvalue_damping": self.eigenvalue_damping, "momentum": self.rule.momentum,
            "beta_1": self.rule.beta_1, "beta_2": self.rule.beta_2,
            "epsilon": self.rule.epsilon, "mode": self.mode, "window_rule": self.window_rule,
            "window_sigma": self.window_sigma, "curvature_ranks": self.curvature_ranks,
            "update_ranks": self.update_ranks, "delivery_delay": self.delivery_delay,
            "rho": self.rho, "tau": self.tau, "x_restart": self.x_restart,
            "nonfinite": self.nonfinite, "seed": self.seed,
        })
        return config


def resolve_loss(model: tf.keras.Model, loss: Callable | str | None) -> Callable:
    """``loss(y_true, y_pred)`` from an explicit loss, a Keras name, or the model's compiled loss.

    Raises:
        ValueError: when no single loss can be found (uncompiled or multi-output model).
    """
    loss = model.loss if loss is None else loss
    if loss is None:
        raise ValueError("No loss given and the model is not compiled: pass `loss=` explicitly.")
    if isinstance(loss, (dict, list, tuple)):
        raise ValueError("DHO2 needs a single loss function; multi-output losses are not "
                         f"supported. Received: {loss!r}")
    return tf.keras.losses.get(loss) if isinstance(loss, str) else loss
