"""DHO2: the Keras optimizer users compile their model with."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import tensorflow as tf

from dho2_tf import hybrid
from dho2_tf.base_rules import BASE_OPTIMIZERS, BaseRule
from dho2_tf.distributed.comm import Communicator, default_comm
from dho2_tf.distributed.sharding import ShardLayout
from dho2_tf.flat import FlatSpec, flatten, unflatten
from dho2_tf.validation import check_int, check_real

logger = logging.getLogger(__name__)

MODES = ("sharded",)


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
        :meth:`bind` once and :meth:`refresh_if_due` before each ``apply_gradients``. Weight
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
        mode: distribution mode; ``"sharded"`` (default).
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
                 epsilon: float = 1e-8, mode: str = "sharded", seed: int = 0,
                 comm: Communicator | None = None, name: str = "DHO2", **kwargs: Any) -> None:
        if kwargs.get("weight_decay"):
            raise ValueError("`weight_decay` is not supported by DHO2: add an L2 term to the loss "
                             "so the curvature estimate sees it. Received: "
                             f"weight_decay={kwargs['weight_decay']}")
        if kwargs.get("use_ema"):
            raise ValueError("`use_ema` is not supported by DHO2. Received: use_ema=True")
        kwargs.pop("weight_decay", None)
        super().__init__(name=name, **kwargs)
        self.rule = BaseRule(base, momentum=momentum, beta_1=beta_1, beta_2=beta_2,
                             epsilon=epsilon)
        self.k = check_int("k", k, minimum=1)
        self.ell = check_int("ell", ell, minimum=0)
        self.alpha = check_real("alpha", alpha, minimum=0.0)
        self.c_max = self.rule.default_c_max if c_max is None else \
            check_real("c_max", c_max, minimum=1.0)
        default_m = 4 * (self.k + self.ell)
        self.lanczos_order = default_m if lanczos_order is None else check_int(
            "lanczos_order", lanczos_order, minimum=self.k + self.ell,
            hint="it must be at least k + ell")
        self.refresh_every = check_int("refresh_every", refresh_every, minimum=1)
        self.warmup = self.refresh_every if warmup is None else check_int("warmup", warmup,
                                                                           minimum=0)
        self.eigenvalue_damping = check_real("eigenvalue_damping", eigenvalue_damping,
                                             minimum=0.0)
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}. Received: mode={mode!r}")
        self.mode = mode
        self.seed = check_int("seed", seed, minimum=0)
        self._learning_rate = self._build_learning_rate(learning_rate)
        self._comm = comm
        self._binding: dict[str, Any] | None = None
        self.last_refresh: dict[str, Any] | None = None

    # ----------------------------------------------------------------------------------- state
    @property
    def comm(self) -> Communicator:
        """The communicator (resolved on first use)."""
        if self._comm is None:
            self._comm = default_comm()
        return self._comm

    @property
    def num_pairs(self) -> int:
        """K = k + ℓ."""
        return self.k + self.ell

    def build(self, var_list: list[tf.Variable]) -> None:
        """Create the flat, sharded state: base slots, Newton momentum and curvature."""
        super().build(var_list)
        if getattr(self, "_built", False):
            return
        self._built = True
        self._spec = FlatSpec.of(var_list)
        self._var_refs = [v.ref() for v in var_list]
        comm = self.comm
        self._layout = ShardLayout(self._spec.n, comm.size, comm.rank)
        s, kk = self._layout.shard_size, self.num_pairs
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
        logger.debug("DHO2 built: n=%d, %r", self._spec.n, self._layout)

    def curvature_variables(self) -> list[tf.Variable]:
        """The optimizer variables that hold per-rank state (for memory accounting)."""
        return [*self._base_slots, self._newton_momentum, self._eigenvalues,
                self._eigenvectors, self._gram, self._rates, self._scale]

    # ----------------------------------------------------------------------------------- step
    def apply_gradients(self, grads_and_vars, name: str | None = None,
                        skip_gradients_aggregation: bool = False, **kwargs: Any) -> tf.Variable:
        """Average the gradients over ranks and apply one hybrid step to all variables."""
        grads_and_vars = list(grads_and_vars)
        if not grads_and_vars:
            return self.iterations
        grads, variables = zip(*grads_and_vars)
        self._compute_current_learning_rate()
        with tf.name_scope(name or self.name):
            with tf.init_scope():
                self.build(list(variables))
            if [v.ref() for v in variables] != self._var_refs:
                raise ValueError("DHO2 updates the whole flat parameter vector: apply_gradients "
                                 "must receive the same variables, in the same order, as when "
                                 "it was built.")
            grads = [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g)
                     for g, v in zip(grads, variables)]
            grads = self._clip_gradients(grads)
            self._hybrid_step(grads, list(variables))
            self.iterations.assign_add(1)
        return self.iterations

    def _hybrid_step(self, grads: list[tf.Tensor], variables: list[tf.Variable]) -> None:
        comm, layout = self.comm, self._layout
        g_flat = flatten(grads, self._spec, variables[0].dtype)
        g_r = comm.reducescatter(layout.pad(g_flat), "mean", name="dho2/gradient")
        theta_r = layout.local(flatten(variables))
        curvature = hybrid.Curvature(self._eigenvectors, self._gram, self._rates, self._scale)
        result = hybrid.hybrid_displacement(
            g_r, self._newton_momentum, [s.value() for s in self._base_slots], curvature,
            self.rule, self.learning_rate, self.alpha, self.iterations + 1, comm)
        self._newton_momentum.assign(result.newton_momentum_r)
        for slot, value in zip(self._base_slots, result.base_slots_r):
            slot.assign(value)
        theta = layout.unpad(comm.allgather(theta_r + result.delta_r, name="dho2/theta"))
        for var, value in zip(variables, unflatten(theta, self._spec)):
            var.assign(value)

    def update_step(self, gradient, variable):  # noqa: D102 - DHO2 updates in apply_gradients
        raise NotImplementedError("DHO2 updates the flat vector in apply_gradients.")

    # -------------------------------------------------------------------------------- refresh
    def bind(self, model: tf.keras.Model, loss: Callable | str | None, batch: tuple,
             *, training: bool = True) -> None:
        """Give the optimizer what a curvature refresh needs.

        Args:
            model: the model being trained (its ``trainable_variables`` are the optimised ones).
            loss: ``loss(y_true, y_pred)``, a Keras loss name, or ``None`` for ``model.loss``.
            batch: ``(x, y)`` curvature batch of this rank (kept fixed across refreshes).
            training: run the model in training mode during HVPs (batch-norm batch statistics;
                moving statistics are restored after each HVP).
        """
        from dho2_tf.curvature.hvp import make_hvp_fn

        loss_fn = resolve_loss(model, loss)
        dtype = model.trainable_variables[0].dtype
        self._binding = {"model": model, "dtype": dtype, "hvp": make_hvp_fn(
            model, loss_fn, batch, training=training, hvp_dtype=dtype)}

    def refresh_due(self) -> bool:
        """Whether the schedule asks for a refresh before the next update."""
        if not getattr(self, "_built", False):
            return False
        due = hybrid.refresh_count_due(int(self.iterations.numpy()), self.warmup,
                                       self.refresh_every)
        return due > int(self._refreshes.numpy())

    def refresh_if_due(self) -> bool:
        """Run :meth:`refresh_curvature` if the schedule asks for it; returns whether it ran."""
        if not self.refresh_due():
            return False
        self.refresh_curvature()
        return True

    def refresh_curvature(self) -> dict[str, Any]:
        """Estimate the extreme eigenpairs at the current weights and install them (eager).

        Every rank must call this at the same step. A failed estimate (non-finite values)
        keeps the previous eigenpairs and is reported in the returned dict and the log.

        Raises:
            RuntimeError: when called before :meth:`bind` or before the optimizer is built.
        """
        from dho2_tf.curvature.spectrum import estimate_spectrum

        if self._binding is None:
            raise RuntimeError("DHO2.refresh_curvature needs a model, loss and batch: call "
                               "optimizer.bind(model, loss, (x, y)) first, or pass "
                               "dho2_tf.CurvatureRefresh(batch=(x, y)) to fit().")
        if not getattr(self, "_built", False):
            self.build(self._binding["model"].trainable_variables)
        start = time.perf_counter()
        index = int(self._refreshes.numpy())
        est = estimate_spectrum(self._binding["hvp"], self._spec.n, self.k, self.ell, self.comm,
                                m=self.lanczos_order, seed=self.seed + index,
                                hvp_dtype=self._binding["dtype"])
        installed = est.num_valid > 0 and est.status.startswith(("ok", "breakdown"))
        if installed:
            self._install(est)
        else:
            logger.warning("DHO2 curvature refresh %d kept the previous eigenpairs: %s",
                           index, est.status)
        self._refreshes.assign_add(1)
        self.last_refresh = {"index": index, "seconds": time.perf_counter() - start,
                             "status": est.status, "installed": installed,
                             "eigenvalues": self._eigenvalues.numpy().copy(),
                             "scale": float(self._scale.numpy())}
        if self.comm.is_root:
            logger.info("DHO2 refresh %d (%.2fs, %s): eigenvalues %s, c=%.3g", index,
                        self.last_refresh["seconds"], est.status,
                        self.last_refresh["eigenvalues"], self.last_refresh["scale"])
        return self.last_refresh

    def _install(self, est: Any) -> None:
        dtype = self._eigenvalues.dtype
        eigenvalues = tf.cast(est.eigenvalues, dtype)
        gram = tf.cast(est.gram, dtype)
        valid = tf.linalg.diag_part(gram) > 0.5
        rates, scale = hybrid.newton_rates(eigenvalues, valid, self.eigenvalue_damping,
                                           self.ell, self.c_max)
        self._eigenvalues.assign(eigenvalues)
        self._eigenvectors.assign(tf.cast(est.vectors_r, dtype))
        self._gram.assign(gram)
        self._rates.assign(rates)
        self._scale.assign(scale)

    def broadcast_state(self, model: tf.keras.Model, root: int = 0) -> None:
        """Copy the model's weights and this optimizer's state from rank ``root`` to all ranks."""
        comm = self.comm
        if comm.size == 1:
            return
        for i, var in enumerate(list(model.variables) + list(self.variables)):
            var.assign(comm.broadcast(var.value(), root, name=f"dho2/broadcast/{i}"))

    # -------------------------------------------------------------------------------- config
    def get_config(self) -> dict[str, Any]:
        """Every constructor argument under its own name (``comm`` excluded)."""
        config = super().get_config()
        config.pop("weight_decay", None)
        config.pop("use_ema", None)
        config.pop("ema_momentum", None)
        config.pop("ema_overwrite_frequency", None)
        config.update({
            "learning_rate": self._serialize_hyperparameter(self._learning_rate),
            "base": self.rule.name, "k": self.k, "ell": self.ell, "alpha": self.alpha,
            "c_max": self.c_max, "lanczos_order": self.lanczos_order,
            "refresh_every": self.refresh_every, "warmup": self.warmup,
            "eigenvalue_damping": self.eigenvalue_damping, "momentum": self.rule.momentum,
            "beta_1": self.rule.beta_1, "beta_2": self.rule.beta_2,
            "epsilon": self.rule.epsilon, "mode": self.mode, "seed": self.seed,
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
