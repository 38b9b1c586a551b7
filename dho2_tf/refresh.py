"""The curvature refresh of one optimizer: its binding, schedule, estimate, install and record.

A refresh reads top-down: before each update the host hooks ask :meth:`Curvature.due` (the
:class:`dho2_tf.refresh_schedule.RefreshSchedule`: FOSI's fixed schedule from a Python copy of
the refresh counter, or the adaptive one, whose staleness checks run here) when the mode asks
for it, and call :meth:`Curvature.refresh`, which estimates (the compiled Lanczos of the
:meth:`Curvature.bind` binding for the first refresh, then the warm-started block refresh of
:mod:`dho2_tf.curvature.warm_start` unless ``refresh_method="lanczos"``; after folding the
momenta out of the old basis), installs the eigenpairs
(:meth:`dho2_tf.optimizer_state.OptimizerState.install`, η and c from λ + the mode's shift) and
records what happened (:func:`refresh_record`, ``last_refresh``). How the mode distributes the
estimate (HVP reduction, basis layout and group, warm starts, the weights it is taken at) comes
as data: :class:`dho2_tf.modes.context.CurvatureCapabilities`.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from dho2_tf.losses import resolve_loss
from dho2_tf.refresh_schedule import RefreshSchedule

logger = logging.getLogger(__name__)

MISSING_BINDING = ("DHO2 needs a model, loss and batch for curvature: call "
                   "optimizer.bind(model, loss, (x, y)) first, or pass "
                   "dho2_tf.CurvatureRefresh(batch=(x, y)) to fit().")


def basis_dtype(lanczos_dtype: str | None, model_dtype: tf.DType) -> str:
    """The dtype of the curvature basis (Lanczos and warm refresh alike): ``lanczos_dtype``, or
    the model's precision when None. The installed eigenvectors are kept in the model's dtype."""
    if lanczos_dtype is not None:
        return lanczos_dtype
    return "float64" if tf.as_dtype(model_dtype) == tf.float64 else "float32"


def binding_key(model: tf.keras.Model, loss: Any, batch: tuple, training: bool) -> tuple:
    """Identifies a binding, so binding the same model, loss and batch again is a no-op."""
    source = model.compiled_loss if loss is None else loss
    return (id(model), id(source), tuple(id(part) for part in batch), training)


def bind_curvature(model: tf.keras.Model, loss: Callable | str | None, batch: tuple,
                   training: bool, make_estimator: Callable[..., Any],
                   lanczos_dtype: str | None, hvp_method: str,
                   block_hvp: str = "map") -> dict[str, Any]:
    """The HVP of ``loss`` at ``model`` on ``batch`` (computed ``hvp_method``, see
    :func:`~dho2_tf.curvature.hvp.make_hvp_fn`) and the mode's compiled estimator.

    With ``block_hvp="vectorized"`` the HVP skips the layers' state updates instead of
    restoring the state (the same product, with no assignment for ``tf.vectorized_map`` to
    fail on), and a model whose layers still assign a variable in the forward pass is refused
    here, before anything is compiled
    (ValueError, :func:`~dho2_tf.curvature.block_ops.check_vectorizable`).

    Traces the HVP and the Lanczos loop now (no HVP runs, no collective), so the first refresh
    costs what later ones do; ``compile_seconds`` in the result is that one-off cost.

    Returns:
        ``{"model", "dtype", "hvp", "estimator", "key", "batch", "compile_seconds"}``;
        ``estimator`` is ``None`` on a rank that never estimates.
    """
    from dho2_tf.curvature.block_ops import check_vectorizable
    from dho2_tf.curvature.hvp import make_hvp_fn

    loss_fn = resolve_loss(model, loss)
    dtype = model.trainable_variables[0].dtype
    vectorized = block_hvp == "vectorized"
    hvp = make_hvp_fn(model, loss_fn, batch, training=training, hvp_dtype=dtype,
                      method=hvp_method, skip_layer_updates=vectorized)
    if vectorized:
        check_vectorizable(hvp, model)
    estimator = make_estimator(hvp, dtype, basis_dtype(lanczos_dtype, dtype))
    return {"model": model, "dtype": dtype, "hvp": hvp, "estimator": estimator,
            "key": binding_key(model, loss, batch, training), "batch": batch,
            "compile_seconds": 0.0 if estimator is None else estimator.trace()}


def refresh_record(index: int, status: str, installed: bool, start: float | None,
                   eigenvalues: tf.Variable, scale: tf.Variable, is_root: bool,
                   est: Any = None) -> dict[str, Any]:
    """What refresh ``index`` did (``last_refresh``), logged on rank 0: ``index``, ``status``,
    ``installed``, ``seconds``, ``eigenvalues``, ``scale``, and from the estimate ``est`` (when
    there is one) ``method`` (``"warm"`` or ``"lanczos"``), ``hvps`` and ``residual`` (max_j
    ‖H̄v_j − λ_j v_j‖ / max_j |λ_j|, warm refreshes only)."""
    record = {"index": index, "status": status, "installed": installed,
              "seconds": 0.0 if start is None else time.perf_counter() - start,
              "eigenvalues": eigenvalues.numpy().copy(), "scale": float(scale.numpy())}
    detail = ""
    if est is not None:
        record.update(method="warm" if est.warm else "lanczos", hvps=int(est.hvps))
        if est.residuals is not None and est.num_valid > 0:
            top = float(np.max(np.abs(est.eigenvalues.numpy())))
            record["residual"] = float(np.max(est.residuals)) / top if top > 0 else float("inf")
            detail = f", relative residual {record['residual']:.2g}"
        detail = f", {record['method']}, {record['hvps']} HVPs" + detail
    if is_root:
        logger.info("DHO2 refresh %d (%.2fs, %s%s): eigenvalues %s, c=%.3g", index,
                    record["seconds"], status, detail, record["eigenvalues"], record["scale"])
    return record


def warn_no_curvature_source(step: int, base: str) -> None:
    """The warning when a refresh is due but nothing is bound (every rank, once)."""
    logger.warning(
        "DHO2 step %d: a curvature refresh is due but no curvature source is bound, so "
        "DHO2 trains as its plain base optimizer (%r) with no second-order step. Pass "
        "callbacks=[dho2_tf.CurvatureRefresh(batch=(x, y))] to fit(), or call "
        "optimizer.bind(model, loss, (x, y)) and the step hooks in a custom loop.", step, base)


class Curvature:
    """The refresh path of one optimizer (attached to its state at ``build``).

    Attributes:
        binding: what :meth:`bind` compiled (``None`` until then): ``model``, ``dtype``,
            ``hvp``, ``estimator``, ``key``, ``batch``.
        last_refresh: the record of the latest refresh (:func:`refresh_record`), or ``None``.
        triggers: pipelined mode: the steps at which weights were handed over.
        compile_seconds: the one-off cost of tracing the HVP and Lanczos graphs in :meth:`bind`.
        schedule: the :class:`~dho2_tf.refresh_schedule.RefreshSchedule` (fixed or adaptive).
    """

    def __init__(self, hp: Any) -> None:
        self.hp = hp
        self.binding: dict[str, Any] | None = None
        self.last_refresh: dict[str, Any] | None = None
        self.triggers: list[int] = []
        self.compile_seconds = 0.0
        # Python copy of state.refreshes (None: re-read; host_driver.HostDriver.forget)
        self.host_refreshes: int | None = None
        self.schedule = RefreshSchedule(hp.warmup, hp.refresh_every, hp.max_refresh_every,
                                        hp.staleness_tol)
        self.pending_check: Any = None   # a staleness check the next refresh continues from
        self.due_step: int | None = None   # the step of the latest due() call

    def attach(self, state: Any, workspace: Any, capabilities: Any, comm: Any, n: int) -> None:
        """Use the built optimizer's state, step buffers, the mode's
        :class:`~dho2_tf.modes.context.CurvatureCapabilities`, the communicator and the number
        of parameters n."""
        self.state, self.workspace, self.comm, self.n = state, workspace, comm, n
        self.capabilities = capabilities
        self.schedule.is_root = comm.is_root

    def make_estimator(self, hvp: Any, dtype: tf.DType, basis_dtype: str) -> Any:
        """The compiled :class:`~dho2_tf.curvature.warm_start.CurvatureEstimator` of this rank
        (``None`` on a rank that never estimates): Lanczos, plus the warm block program when
        ``refresh_method="warm"`` or the schedule is adaptive (its staleness check)."""
        from dho2_tf.curvature.spectrum import SpectrumEstimator
        from dho2_tf.curvature.warm_start import BlockRitzProgram, CurvatureEstimator

        caps, hp = self.capabilities, self.hp
        if not caps.estimates:
            return None
        common = dict(process_set=caps.lanczos_group, hvp_dtype=dtype, basis_dtype=basis_dtype,
                      basis_layout=caps.lanczos_basis, hvp_reduce=caps.hvp_reduce)
        lanczos = SpectrumEstimator(hvp, self.n, hp.k, hp.ell, self.comm, m=hp.lanczos_order,
                                    **common)
        block = None
        if caps.warm_refresh and (hp.refresh_method == "warm"
                                  or hp.max_refresh_every is not None):
            block = BlockRitzProgram(hvp, self.n, hp.k, hp.ell, self.comm,
                                     extra=hp.warm_extra, batching=hp.block_hvp,
                                     name="dho2/warm", **common)
        return CurvatureEstimator(lanczos, block)

    def bind(self, model: tf.keras.Model, loss: Callable | str | None, batch: tuple,
             training: bool) -> None:
        """Bind the model, loss and batch (a no-op for the same ones) and trace the graphs."""
        if self.binding is not None and self.binding["key"] == binding_key(model, loss, batch,
                                                                           training):
            return  # the same binding (e.g. a second fit call): keep the compiled graphs
        self.binding = bind_curvature(model, loss, batch, training, self.make_estimator,
                                      self.hp.lanczos_dtype, self.hp.hvp_method,
                                      self.hp.block_hvp)
        self.compile_seconds = self.binding["compile_seconds"]
        estimator = self.binding["estimator"]
        if self.comm.is_root and estimator is not None:
            program = estimator.program
            warm = "" if estimator.block is None else \
                f", warm refresh {estimator.block.hvps_per_refresh} HVPs in 2 blocks"
            logger.info("DHO2 compiled the curvature graphs in %.2fs (n=%d, Lanczos m=%d%s; "
                        "%s %s basis, eigenvectors stored in %s)", self.compile_seconds,
                        program.n, program.m, warm, estimator.basis_layout,
                        estimator.basis_dtype.name, self.binding["dtype"].name)

    def require_binding(self) -> None:
        """RuntimeError unless :meth:`bind` ran."""
        if self.binding is None:
            raise RuntimeError(MISSING_BINDING)

    def index(self) -> int:
        """Refreshes done so far (also the next refresh's seed offset)."""
        return int(self.state.refreshes.numpy())

    def forget(self) -> None:
        """Re-read the refresh counter next time (it may have been restored)."""
        self.host_refreshes = None

    def due(self, iterations: int) -> bool:
        """Whether a refresh is due before update ``iterations`` (no variable read once the
        counter's Python copy exists). With the adaptive schedule a check point runs the
        staleness check here (collective: every rank calls ``due`` at the same steps)."""
        if self.host_refreshes is None:
            self.host_refreshes = self.index()
            self.schedule.sync(self.host_refreshes, iterations)
        self.due_step = iterations
        return self.schedule.due(iterations, self.host_refreshes, self.check_staleness)

    def request_refresh(self, reason: str) -> None:
        """Make the next :meth:`due` true (see
        :meth:`~dho2_tf.refresh_schedule.RefreshSchedule.request_refresh`); every rank calls
        it at the same step. ``mode="pipelined"`` triggers on its fixed schedule only."""
        self.schedule.request_refresh(reason)

    def check_staleness(self, iterations: int) -> float | None:
        """The staleness s of the installed eigenpairs now (one block HVP at the mode's
        curvature weights, every rank of the world; ``None`` when there is nothing to check:
        unbound, or before the first refresh). A check the refresh can continue from is kept
        for it."""
        if self.binding is None:
            return None
        start = self.installed_pairs()
        if start is None:
            return None
        with self.capabilities.weights():
            check = self.binding["estimator"].check(start, seed=self.hp.seed + self.index())
        self.pending_check = check if self.capabilities.reuses_check else None
        return check.staleness

    def installed_pairs(self) -> Any:
        """The installed eigenpairs as a :class:`~dho2_tf.curvature.warm_start.WarmStart` in
        the estimator's basis layout, or ``None`` when no pair is valid (before the first
        refresh). Reads only replicated values to decide, so every rank agrees."""
        from dho2_tf.curvature.warm_start import WarmStart

        st = self.state
        valid = np.diag(st.gram.numpy()) > 0.5
        if not valid.any():
            return None
        rows = st.eigenvectors.value()
        if self.capabilities.gathers_vectors:   # full V, sharded basis (the estimator's layout)
            layout = self.binding["estimator"].layout
            rows = tf.transpose(layout.local(tf.transpose(rows)))  # its columns
        return WarmStart(rows, valid, st.eigenvalues.numpy().astype(np.float64),
                         self.schedule.installed_residual)

    def estimate(self, check: Any = None) -> Any:
        """The extreme eigenpairs at the mode's curvature weights (every rank of the world
        calls it): Lanczos for the first refresh or with ``refresh_method="lanczos"``, else the
        warm block refresh from the installed eigenvectors (continuing ``check`` when given).

        First folds the Newton momentum out of the basis of the current V
        (:meth:`materialize_momentum`), since the refresh may replace V.
        """
        self.materialize_momentum()
        warm = self.capabilities.warm_refresh and self.hp.refresh_method == "warm"
        with self.capabilities.weights():
            return self.binding["estimator"].estimate(
                seed=self.hp.seed + self.index(),
                start=self.installed_pairs() if warm else None, check=check if warm else None)

    def vectors_for_state(self, vectors_r: tf.Tensor) -> tf.Tensor:
        """The estimate's shard of V in the state's layout (all-gathered to full V when the
        state is full and the basis sharded)."""
        if not self.capabilities.gathers_vectors:
            return vectors_r
        from dho2_tf.curvature.spectrum import gather_vectors

        return gather_vectors(vectors_r, self.n, self.comm)

    def materialize_momentum(self) -> None:
        """Fold the momenta out of the basis of V before V changes and drop cached projections."""
        self.state.materialize_momentum()
        self.workspace.projected_at.assign(-1)

    def refresh(self) -> dict[str, Any]:
        """Estimate the extreme eigenpairs at the current weights (the mode's estimate, every
        rank at the same step) and install them; a non-finite estimate keeps the old ones."""
        self.require_binding()
        start = time.perf_counter()
        check, self.pending_check = self.pending_check, None
        est = self.estimate(check=check)
        if est.num_valid > 0 and est.status.startswith(("ok", "breakdown")):
            self.install(est.eigenvalues, self.vectors_for_state(est.vectors_r), est.gram,
                         status=est.status, start=start, est=est)
        else:
            logger.warning("DHO2 curvature refresh %d kept the previous eigenpairs: %s",
                           self.index(), est.status)
            self.count(installed=False, status=est.status, start=start, est=est)
        return self.last_refresh

    def install(self, eigenvalues: tf.Tensor, vectors: tf.Tensor, gram: tf.Tensor, status: str,
                start: float | None = None, est: Any = None) -> None:
        """Install (λ, V in the state layout, Γ), derive η and c, and count the refresh."""
        self.state.install(eigenvalues, vectors, gram, self.capabilities.eigenvalue_shift,
                           self.hp.eigenvalue_damping, self.hp.ell, self.hp.c_max)
        self.count(installed=True, status=status, start=start, est=est)

    def count(self, installed: bool, status: str, start: float | None = None,
              est: Any = None) -> None:
        """Advance the refresh counter and record what happened (logged on rank 0)."""
        index = self.index()
        self.state.refreshes.assign_add(1)
        self.host_refreshes = index + 1
        self.last_refresh = refresh_record(index, status, installed, start,
                                           self.state.eigenvalues, self.state.scale,
                                           self.comm.is_root, est)
        measured = installed and est is not None and est.residuals is not None
        self.schedule.refreshed(self.due_step, index + 1,
                                float(np.max(est.residuals)) if measured else
                                (0.0 if installed else None))

    def metrics(self) -> dict[str, float]:
        """eigenvalue_j, lr_scale, refreshes, skipped_steps, refresh and compile seconds, the
        last refresh's ``refresh_hvps``, ``refresh_warm`` (1 warm, 0 Lanczos) and
        ``refresh_residual``, and the schedule's (:meth:`RefreshSchedule.metrics`)."""
        st = self.state
        out = {f"eigenvalue_{j}": float(v) for j, v in enumerate(st.eigenvalues.numpy())}
        out.update(lr_scale=float(st.scale.numpy()), refreshes=float(st.refreshes.numpy()),
                   skipped_steps=float(st.skipped.numpy()))
        if self.last_refresh is not None:
            out["refresh_seconds"] = float(self.last_refresh["seconds"])
            for key in ("hvps", "residual"):
                if key in self.last_refresh:
                    out[f"refresh_{key}"] = float(self.last_refresh[key])
            if "method" in self.last_refresh:
                out["refresh_warm"] = float(self.last_refresh["method"] == "warm")
        out.update(self.schedule.metrics())
        if self.compile_seconds:
            out["curvature_compile_seconds"] = float(self.compile_seconds)
        return out
