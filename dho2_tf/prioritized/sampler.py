"""The per-rank priority table and the PSGD refresh/select schedule (Zhou & Gao, IC2E 2021)."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import tensorflow as tf

from dho2_tf.distributed.comm import Communicator, default_comm
from dho2_tf.prioritized import per_example as _per_example
from dho2_tf.prioritized import priorities, staleness, switch
from dho2_tf.prioritized import selection as _selection

logger = logging.getLogger(__name__)

REFRESHES = ("pass", "free")

#: The recommended configuration, which is also the constructor's default (see
#: :meth:`PrioritizedSampler.recommended`): importance sampling switched on only when τ says it
#: pays for its measured cost, priorities refreshed for free from the training step's forward
#: pass every ``bookkeeping_interval`` steps while sampling is uniform, last-layer gradient
#: norms, and a proposal half uniform (γ = 0.5: an example's importance weight is at most 1/γ = 2
#: times its uniform one, so the learning rate tuned for uniform sampling stays usable when
#: importance sampling switches on; docs/prioritized.md has the comparison with γ = 0.1).
RECOMMENDED: dict[str, Any] = {"priority": "length", "init_priority": "length",
                               "estimator": "keep", "selection": "adaptive", "refresh": "free",
                               "per_example": "auto", "gamma": 0.5, "aggregate_report": False,
                               "theta_e": 0.8, "gbar_update": "ema", "bookkeeping_interval": 16,
                               "cost_ratio": "measured"}

#: The paper's released configuration (Zhou & Gao, IC2E 2021, and its released code): length
#: priorities for the initial pass, projection priorities ⟨g_i, ḡ⟩ on refresh, an r% round-robin
#: refresh pass with exact per-example gradients, the exp-decay staleness estimator with
#: θ_e = 0.8, the biased per-shard top-k selection and no aggregated report; ḡ follows the
#: intended EMA (``gbar_update="as_released"`` reproduces the released formula). γ = 0.1 is the
#: floor of the importance proposal if ``selection`` is overridden. See
#: :meth:`PrioritizedSampler.paper`.
PAPER: dict[str, Any] = {"priority": "projection", "init_priority": "length",
                         "estimator": "exp-decay", "selection": "topk", "refresh": "pass",
                         "per_example": "exact", "gamma": 0.1, "aggregate_report": False,
                         "theta_e": 0.8, "gbar_update": "ema", "bookkeeping_interval": 1,
                         "cost_ratio": 1.0}

#: ``cost_ratio`` value that measures ĉ from the run's own step times.
MEASURED = "measured"


def _check_fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"`{name}` must be a fraction in (0, 1]. Received: {name}={value!r}")
    return float(value)


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    return value


@tf.keras.utils.register_keras_serializable(package="dho2_tf")
class PrioritizedSampler(tf.Module):
    """Prioritized SGD (PSGD): train each step on the highest-priority examples of the shard.

    Each rank owns the priority table of its shard D_j (n_j examples). Per step it re-scores
    R_j = ⌊r·n_j⌋ examples (round robin), then selects K_j = ⌊k·n_j⌋ examples for the update.

    Math:
        Symbols: k = ``k``, r = ``r``, θ_e = ``theta_e``, γ = ``gamma``; g_i = ∇ℓ_i(w).

        Priorities (``priority``, ``init_priority``)::

            length:      p_i = ‖g_i‖²            projection: p_i = ⟨g_i, ḡ⟩
            loss:        p_i = ℓ_i

        Full-gradient estimate: ḡ = (1/n_j) Σ_i g_i after the initial pass, then after each
        refresh of the set Ref with G_ref = Σ_{i∈Ref} g_i and f = R_j/n_j::

            ema:         ḡ ← (1 − f)·ḡ + f·G_ref/R_j
            as_released: ḡ ← f(1 − f)·ḡ + f·G_ref

        Staleness (``estimator``): each example keeps (p_i, t_i, a_i)::

            keep:        p̂_i(t) = p_i
            exp-decay:   p̂_i(t) = p_i·exp(a_i (t − t_i)),
                         on refresh at t ≠ t_i with new value p′:
                         ℓ = log(p′/p_i) if p_i ≠ 0 and p′/p_i > 0 else 0,
                         a_i ← θ_e·ℓ/(t − t_i) + (1 − θ_e)·a_i,  p_i ← p′,  t_i ← t.

        Selection (``selection``) and loss weights w (training loss Σ_{i∈S} w_i ℓ_i)::

            topk:        S = argtop_{K_j} p̂(t) of the shard,          w_i = 1/K_j   (biased)
            importance:  S = K_j i.i.d. draws from q,                   w_i = 1/(K_j·n_j·q_i)
                         q_i = (1 − γ)·ψ_i/Σ_l ψ_l + γ/n_j,  ψ = sqrt(p̂⁺) (length) or p̂⁺
            global:      S = argtop_{K} p̂(t) over the union of shards, K = Σ_j K_j,
                         w_i = P/K on the owning rank (mean over the K points after averaging)
            adaptive:    importance while τ̄ > max(τ_th, ĉ), else K_j i.i.d. uniform draws
                         (w_i = 1/K_j); τ = Σ_ranks V_u / Σ_ranks V_q, τ̄ ← m·τ̄ + (1 − m)·τ,
                         ĉ = Σ_ranks T̄_full / Σ_ranks T̄_light (measured cost ratio), with
                         V_u = (1/n_j)Σ_i s_i², V_q = (1/n_j²)Σ_i s_i²/q_i, s_i = sqrt of the
                         norm² priority (length) or ψ_i: from the table after the initial pass
                         and with refresh="pass", from the batch's fresh scores with
                         refresh="free" (Katharopoulos & Fleuret, 2018; see
                         :mod:`dho2_tf.prioritized.switch`)
            pool:        C_j = min(n_j, ⌈pool·K_j⌉) distinct uniform candidates, one forward
                         pass, S = the K_j largest ℓ_i among them, w_i = 1/K_j (biased; online
                         batch selection / Selective Backprop)

        Refresh (``refresh``): ``pass`` re-scores R_j round-robin examples per step (the paper);
        ``free`` re-scores no extra example: the training step's own forward pass gives ℓ_i and
        (closed form, last Dense layer) g_i of every example of the batch, which are stored
        with stamp t, and ḡ ← (1 − f)·ḡ + f·Σ_S w_i g_i/Σ_S w_i with f = min(1, K_j/n_j).

        Bookkeeping interval N (``selection="adaptive"``, ``refresh="free"``): step t is a
        *full* step (scores, priority scatter, τ and ḡ update, draw from the proposal) when::

            t mod N = 0,  or importance sampling is on and t mod N ≠ 1,

        otherwise a *light* step: K_j uniform draws with replacement, w_i = 1/K_j, nothing else.
        While sampling is uniform, one step in N pays for the bookkeeping; while it is on, one
        step in N stays light so both step times keep being measured. T̄_full and T̄_light are
        the mean in-graph times of the two kinds of step on this rank (from ``tf.timestamp``,
        so Keras' per-step overhead, common to both, is left out: when a full step costs more
        than a light one, ĉ is larger than the ratio of whole step times); ĉ = 1 until both kinds have run. With a number for
        ``cost_ratio``, ĉ is that number.

        With ``aggregate_report`` the refresh set is added to the step: loss
        Σ_{i∈S} w_i ℓ_i + (1/R_j) Σ_{i∈Ref} ℓ_i, i.e. Δ = −η(G_top/K + G_ref/R) as released.

    Note:
        The initial full pass is step 0 and training steps start at t = 1, so the first refresh
        of an example is never a same-step no-op. ``per_example="last_layer"`` makes ḡ and all
        gradient priorities use only the last Dense layer's parameters. With
        ``aggregate_report`` the refresh-set gradient is recomputed in the batched backward pass.

    The defaults are the recommended configuration (:data:`RECOMMENDED`, equal to
    :meth:`recommended`); :meth:`paper` builds the paper's released configuration
    (:data:`PAPER`) for reproduction.

    Args:
        k: fraction of the shard selected per step, in (0, 1].
        r: fraction of the shard re-scored per step, in (0, 1] (unused by the steps with
            ``refresh="free"``, but ⌊r·n_j⌋ must be ≥ 1).
        priority: priority computed on refresh: ``"length"`` (default), ``"projection"``,
            ``"loss"``.
        init_priority: priority of the initial pass (default ``"length"``, as released).
        estimator: ``"keep"`` (default) or ``"exp-decay"`` (alias ``"explinear"``, released).
        selection: ``"adaptive"`` (default: uniform, or importance sampling when it pays),
            ``"topk"`` (the paper's rule), ``"importance"`` (unbiased), ``"global"`` (exact
            top-k of the union of the ranks' shards) or ``"pool"``.
        aggregate_report: also train on the refresh set (the paper's variation 'r').
        theta_e: EMA weight of the exp-decay fit, in (0, 1].
        gamma: uniform floor γ of the importance proposal, in (0, 1] (default 0.5).
        max_weight: optional clip of n_j·q_i-normalised importance weights (biased when hit).
        gbar_update: ``"ema"`` (default) or ``"as_released"``.
        per_example: ``"auto"`` (default: last layer when the model ends in ``Dense``, else
            exact), ``"exact"`` (vectorised full gradients) or ``"last_layer"`` (shortcut).
        refresh: ``"free"`` (default: from the training step's forward pass; needs a
            last-layer scorer or ``priority="loss"``) or ``"pass"`` (the paper's r% pass).
        pool: candidate-pool factor of ``selection="pool"`` (C_j = ⌈pool·K_j⌉), ≥ 1.
        tau_threshold: τ_th of ``selection="adaptive"`` (importance sampling while τ̄ > τ_th),
            ≥ 1.
        tau_momentum: m, the EMA weight of τ̄, in [0, 1).
        bookkeeping_interval: N ≥ 1, see above (default 16: with m = 0.9, τ̄ has moved 90% of
            the way to a new τ after 22 updates, i.e. within 352 steps); 1 scores every step.
        cost_ratio: ĉ of ``selection="adaptive"``: ``"measured"`` (default) or a fixed
            number > 0 (1.0 gives the rule τ̄ > τ_th).
        chunk_size: examples scored per vectorised call in the initial pass.
        seed: seed of the importance draws (combined with the rank).

    Attributes:
        is_bound: whether :meth:`bind` attached a model and a shard.
        is_initialized: whether :meth:`initialize` ran the initial pass on the bound shard.
        num_selected: K_j (after ``bind``); ``num_selected_total`` is K = Σ_j K_j.
        num_refreshed: R_j (after ``bind``).
        shard_sizes: n_j of every rank, in rank order (after ``bind``).
        prio, prio_t, prio_a: the table variables p [n_j], t [n_j], a [n_j].
        gbar: ḡ, one variable per parameter of the scorer's space.
        step: t, the step counter; ``evaluations`` counts per-example gradient evaluations
            (the forward-only candidates of ``selection="pool"`` are not counted).
        tau, tau_ema, importance_on: the last τ, τ̄ and the decision (``adaptive``).
        cost: the ĉ of the last decision (``adaptive``).
        bookkeeping_steps: the number of full steps since the initial pass.
        step_seconds, step_counts: float64 [2], summed in-graph seconds and number of the
            [light, full] steps since the initial pass.

    Raises:
        ValueError: for a parameter outside its range or an unknown choice.

    References:
        T. Zhou, L. Gao, "Distributed Framework for Accelerating Training of Deep Learning Models
        through Prioritization", IEEE IC2E 2021, DOI 10.1109/IC2E52221.2021.00035;
        Zhou & Gao, "Prioritized SGD", IC2E 2021; docs/prioritized.md.
    """

    def __init__(self, k: float = 0.05, r: float = 0.01, *, priority: str = "length",
                 init_priority: str = "length", estimator: str = "keep",
                 selection: str = "adaptive", aggregate_report: bool = False,
                 theta_e: float = 0.8, gamma: float = 0.5, max_weight: float | None = None,
                 gbar_update: str = "ema", per_example: str = "auto", chunk_size: int = 256,
                 seed: int = 0, refresh: str = "free", pool: float = 3.0,
                 tau_threshold: float = 1.5, tau_momentum: float = 0.9,
                 bookkeeping_interval: int = 16, cost_ratio: float | str = MEASURED) -> None:
        super().__init__(name="prioritized_sampler")
        self.k = _check_fraction("k", k)
        self.r = _check_fraction("r", r)
        self.priority = priorities.check_choice("priority", priority, priorities.PRIORITIES)
        self.init_priority = priorities.check_choice("init_priority", init_priority,
                                                     priorities.PRIORITIES)
        self.estimator = staleness.canonical_estimator(estimator)
        self.selection = priorities.check_choice("selection", selection, _selection.SELECTIONS)
        self.aggregate_report = bool(aggregate_report)
        self.theta_e = _check_fraction("theta_e", theta_e)
        self.gamma = _check_fraction("gamma", gamma)
        if max_weight is not None and not (isinstance(max_weight, (int, float)) and max_weight > 0):
            raise ValueError(
                "`max_weight` must be None or a positive number. "
                f"Received: max_weight={max_weight!r}")
        self.max_weight = None if max_weight is None else float(max_weight)
        self.gbar_update = priorities.check_choice("gbar_update", gbar_update,
                                                   priorities.GBAR_UPDATES)
        self.per_example = priorities.check_choice("per_example", per_example,
                                                   _per_example.SCORERS)
        self.chunk_size = _check_positive_int("chunk_size", chunk_size)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"`seed` must be an integer. Received: seed={seed!r}")
        self.seed = seed
        self.refresh_mode = priorities.check_choice("refresh", refresh, REFRESHES)
        if self.refresh_mode == "free" and self.aggregate_report:
            raise ValueError("`aggregate_report` trains on the refresh set, which "
                             "`refresh='free'` does not have. Received: aggregate_report=True, "
                             "refresh='free'")
        for name, value, low in (("pool", pool, 1.0), ("tau_threshold", tau_threshold, 1.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
                raise ValueError(f"`{name}` must be a number ≥ {low:g}. "
                                 f"Received: {name}={value!r}")
        self.pool = float(pool)
        self.tau_threshold = float(tau_threshold)
        if isinstance(tau_momentum, bool) or not isinstance(tau_momentum, (int, float)) \
                or not 0.0 <= tau_momentum < 1.0:
            raise ValueError("`tau_momentum` must be in [0, 1). "
                             f"Received: tau_momentum={tau_momentum!r}")
        self.tau_momentum = float(tau_momentum)
        self.bookkeeping_interval = _check_positive_int("bookkeeping_interval",
                                                        bookkeeping_interval)
        if cost_ratio != MEASURED and (isinstance(cost_ratio, (bool, str))
                                       or not isinstance(cost_ratio, (int, float))
                                       or not cost_ratio > 0):
            raise ValueError(f"`cost_ratio` must be {MEASURED!r} or a number > 0. "
                             f"Received: cost_ratio={cost_ratio!r}")
        self.cost_ratio = cost_ratio if cost_ratio == MEASURED else float(cost_ratio)
        self.is_bound = False
        self.is_initialized = False

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in sorted(self.get_config().items()))
        return f"PrioritizedSampler({args})"

    def get_config(self) -> dict[str, Any]:
        """Every constructor argument under its own name."""
        return {"k": self.k, "r": self.r, "priority": self.priority,
                "init_priority": self.init_priority, "estimator": self.estimator,
                "selection": self.selection, "aggregate_report": self.aggregate_report,
                "theta_e": self.theta_e, "gamma": self.gamma, "max_weight": self.max_weight,
                "gbar_update": self.gbar_update, "per_example": self.per_example,
                "chunk_size": self.chunk_size, "seed": self.seed, "refresh": self.refresh_mode,
                "pool": self.pool, "tau_threshold": self.tau_threshold,
                "tau_momentum": self.tau_momentum,
                "bookkeeping_interval": self.bookkeeping_interval, "cost_ratio": self.cost_ratio}

    @classmethod
    def recommended(cls, k: float = 0.05, r: float = 0.01, **overrides: Any
                    ) -> "PrioritizedSampler":
        """The recommended configuration :data:`RECOMMENDED`, also the constructor's default
        (``overrides`` replace entries).

        Uniform sampling until the variance reduction τ of importance sampling pays for its
        measured cost ĉ, then draws from q_i = ½·‖g_i‖/Σ‖g_l‖ + ½/n; priorities ‖g_i‖² (last
        layer) refreshed for free by the training steps, every N-th step while sampling is
        uniform; ``r`` is unused by the steps (no refresh pass) but must still give
        ⌊r·n_j⌋ ≥ 1.
        """
        return cls(k, r, **{**RECOMMENDED, **overrides})

    @classmethod
    def paper(cls, k: float = 0.05, r: float = 0.01, **overrides: Any) -> "PrioritizedSampler":
        """The paper's released configuration :data:`PAPER`, for reproduction (``overrides``
        replace entries).

        Each step re-scores ⌊r·n_j⌋ examples round robin with exact per-example gradients
        (⟨g_i, ḡ⟩) and trains on the ⌊k·n_j⌋ largest exp-decay estimates p̂_i(t), unweighted.
        The top-k selection is biased: it trains on a narrow set of high-priority examples
        and can end at a low validation accuracy (docs/prioritized.md).
        """
        return cls(k, r, **{**PAPER, **overrides})

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "PrioritizedSampler":
        """Inverse of :meth:`get_config`."""
        return cls(**config)

    # ------------------------------------------------------------------ binding
    def bind(self, model: tf.keras.Model, loss: Any, x: Any, y: Any,
             comm: Communicator | None = None) -> None:
        """Attach the model, its loss and this rank's shard ``(x, y)``; create the table.

        Every rank must call ``bind`` (it gathers the shard sizes). Rebinding resets the table.

        Args:
            model: the Keras model being trained (built on ``x[:1]`` if needed).
            loss: the compiled loss (see :func:`.per_example.per_example_loss_fn`).
            x: this rank's inputs [n_j, ...] (array-like).
            y: this rank's targets [n_j, ...].
            comm: communicator (default :func:`default_comm`).

        Raises:
            ValueError: if ``k·n_j`` or ``r·n_j`` is below one example, or x and y disagree.
        """
        self.comm = comm or default_comm()
        self.x = tf.convert_to_tensor(x)
        self.y = tf.convert_to_tensor(y)
        n_local = int(self.x.shape[0])
        if int(self.y.shape[0]) != n_local:
            raise ValueError(f"`x` and `y` must have the same number of examples. "
                             f"Received: {n_local} and {int(self.y.shape[0])}")
        self.num_selected = math.floor(self.k * n_local)
        self.num_refreshed = math.floor(self.r * n_local)
        for name, count in (("k", self.num_selected), ("r", self.num_refreshed)):
            if count < 1:
                raise ValueError(f"`{name}` selects {count} of the shard's {n_local} examples; "
                                 f"`{name}·n_local` must be at least 1. "
                                 f"Received: {name}={getattr(self, name)}")
        self.shard_sizes = [int(n) for n in self.comm.allgather_object(
            n_local, name="dho2/prioritized/shard_sizes")]
        self.num_selected_total = sum(math.floor(self.k * n) for n in self.shard_sizes)
        if not model.built:
            model(self.x[:1], training=False)
        self.loss_fn = _per_example.per_example_loss_fn(loss)
        self.scorer = _per_example.make_scorer(
            self.per_example, model, self.loss_fn,
            priorities.needs_gradients(self.priority, self.init_priority))
        if self.refresh_mode == "free" and isinstance(self.scorer, _per_example.ExactScorer):
            raise ValueError(
                "`refresh='free'` takes gradients from the training step's forward pass, in "
                "closed form for the last Dense layer only: use per_example='last_layer' or "
                "'auto' with a model ending in Dense, or priority='loss' and "
                f"init_priority='loss'. Received: per_example={self.per_example!r}, "
                f"priority={self.priority!r}, init_priority={self.init_priority!r}")
        self._forward = _per_example.LossScorer(model, self.loss_fn)  # plain object: untracked
        self.pool_size = min(n_local, math.ceil(self.pool * self.num_selected))
        self.prio = tf.Variable(tf.zeros([n_local]), trainable=False, name="priority")
        self.prio_t = tf.Variable(tf.zeros([n_local], tf.int32), trainable=False, name="prio_t")
        self.prio_a = tf.Variable(tf.zeros([n_local]), trainable=False, name="prio_a")
        self.gbar = [tf.Variable(tf.zeros_like(v), trainable=False, name="gbar")
                     for v in self.scorer.variables]
        self.cursor = tf.Variable(0, trainable=False, name="cursor")
        self.step = tf.Variable(0, trainable=False, name="step")
        self.evaluations = tf.Variable(0, dtype=tf.int64, trainable=False, name="evaluations")
        self.rng = tf.random.Generator.from_seed(self.seed * 65_537 + self.comm.rank)
        self.tau = tf.Variable(1.0, trainable=False, name="tau")
        self.tau_ema = tf.Variable(1.0, trainable=False, name="tau_ema")
        self.importance_on = tf.Variable(False, trainable=False, name="importance_on")
        self.cost = tf.Variable(1.0, trainable=False, name="cost_ratio")
        self.bookkeeping_steps = tf.Variable(0, dtype=tf.int64, trainable=False,
                                             name="bookkeeping_steps")
        self.step_seconds = tf.Variable(tf.zeros([2], tf.float64), trainable=False,
                                        name="step_seconds")
        self.step_counts = tf.Variable(tf.zeros([2], tf.float64), trainable=False,
                                       name="step_counts")
        self._initial_chunk = tf.function(self._score_initial_chunk)
        self.is_bound = True
        self.is_initialized = False

    def _require_bound(self) -> None:
        if not self.is_bound:
            raise RuntimeError("The sampler has no data yet: call `bind(model, loss, x, y)` (or "
                               "`PrioritizedModel.fit(x, y)`) first.")

    @property
    def n_local(self) -> int:
        """n_j, the number of examples of this rank's shard."""
        self._require_bound()
        return int(self.x.shape[0])

    @property
    def table(self) -> staleness.PriorityTable:
        """The current (p, t, a) table."""
        self._require_bound()
        return staleness.PriorityTable(self.prio.value(), self.prio_t.value(),
                                       self.prio_a.value())

    def _assign_table(self, table: staleness.PriorityTable) -> None:
        self.prio.assign(table.p)
        self.prio_t.assign(table.t)
        self.prio_a.assign(table.a)

    # ------------------------------------------------------------------ initial pass
    def _score_initial_chunk(self, start: tf.Tensor, priority: str) -> list[tf.Tensor]:
        chunk = min(self.chunk_size, self.n_local)
        positions = start + tf.range(chunk)
        idx = positions % self.n_local  # the last chunk wraps; duplicates carry equal values
        mask = tf.cast(positions < self.n_local, tf.float32)
        scores = self.scorer(tf.gather(self.x, idx), tf.gather(self.y, idx), self.gbar, mask)
        self.prio.scatter_nd_update(idx[:, None], priorities.priority_values(scores, priority))
        return scores.grad_sum

    def initialize(self) -> None:
        """Initial pass: p_i = ``init_priority`` for every example, ḡ = mean gradient, t = 1.

        A ``projection`` initial priority needs ḡ first, so it costs a second pass.
        """
        self._require_bound()
        started = time.perf_counter()
        passes = 2 if self.init_priority == "projection" else 1
        chunk = min(self.chunk_size, self.n_local)
        for pass_index in range(passes):
            priority = self.init_priority if pass_index == passes - 1 else "length"
            sums = [tf.zeros_like(v) for v in self.gbar]
            for start in range(0, self.n_local, chunk):
                chunk_sums = self._initial_chunk(tf.constant(start), priority)
                sums = [s + c for s, c in zip(sums, chunk_sums)]
            if pass_index == 0:
                for g, s in zip(self.gbar, sums):
                    g.assign(s / self.n_local)
        self.prio_t.assign(tf.zeros_like(self.prio_t))
        self.prio_a.assign(tf.zeros_like(self.prio_a))
        self.cursor.assign(0)
        self.step.assign(1)
        self.evaluations.assign(passes * self.n_local)
        self.bookkeeping_steps.assign(0)
        self.step_seconds.assign(tf.zeros_like(self.step_seconds))
        self.step_counts.assign(tf.zeros_like(self.step_counts))
        if self.selection == "adaptive":
            tau = self._update_switch(self.estimated_priorities(), 0.0)[0]  # fresh table
            if self.comm.is_root:
                logger.info("Initial variance reduction τ = %.3f (threshold max(%.3f, ĉ = "
                            "%.3f)): %s sampling", float(tau), self.tau_threshold,
                            float(self.cost.numpy()),
                            "importance" if bool(self.importance_on.numpy()) else "uniform")
        self.is_initialized = True
        if self.comm.is_root:
            logger.info("Initial priority pass over %d examples (%d pass(es)) in %.2f s",
                        self.n_local, passes, time.perf_counter() - started)

    # ------------------------------------------------------------------ per step (graph-safe)
    def refresh(self) -> tf.Tensor:
        """Re-score the next R_j examples of the round robin; returns their indices int32 [R_j].

        With ``refresh="free"`` nothing is re-scored here (the step's forward pass does it, see
        :meth:`refresh_from_step`) and the result is empty.
        """
        self._require_bound()
        if self.refresh_mode == "free":
            return tf.zeros([0], tf.int32)
        idx = (self.cursor + tf.range(self.num_refreshed)) % self.n_local
        scores = self.scorer(tf.gather(self.x, idx), tf.gather(self.y, idx), self.gbar)
        p_new = priorities.priority_values(scores, self.priority)
        self._assign_table(staleness.refresh_priorities(
            self.table, idx, p_new, self.step, self.estimator, self.theta_e))
        if self.gbar:
            new_gbar = priorities.update_gbar(
                self.gbar, scores.grad_sum, self.num_refreshed,
                self.num_refreshed / self.n_local, self.gbar_update)
            for g, value in zip(self.gbar, new_gbar):
                g.assign(value)
        self.cursor.assign((self.cursor + self.num_refreshed) % self.n_local)
        self.evaluations.assign_add(self.num_refreshed)
        return idx

    def store(self, idx: tf.Tensor, scores: _per_example.Scores,
              keep: tf.Tensor | None = None) -> None:
        """Store the ``priority`` column of ``scores`` for the examples ``idx`` at step t.

        Repeated indices (importance draws) carry identical scores, so the result is the same
        as storing each example once. ``keep`` (bool [B]) restricts the store to those rows.
        """
        values = priorities.priority_values(scores, self.priority)
        if keep is not None:
            idx, values = tf.boolean_mask(idx, keep), tf.boolean_mask(values, keep)
        self._assign_table(staleness.refresh_priorities(
            self.table, idx, values, self.step, self.estimator, self.theta_e))

    @property
    def has_light_steps(self) -> bool:
        """Whether some steps skip the bookkeeping (``adaptive``, ``free``, N > 1)."""
        return (self.selection == "adaptive" and self.refresh_mode == "free"
                and self.bookkeeping_interval > 1)

    def is_full_step(self) -> tf.Tensor:
        """bool []: whether step t does the bookkeeping (see the class docstring)."""
        if not self.has_light_steps:
            return tf.constant(True)
        phase = self.step % self.bookkeeping_interval
        return tf.logical_or(phase == 0, tf.logical_and(self.importance_on, phase != 1))

    def record_step_time(self, full: tf.Tensor, seconds: tf.Tensor) -> None:
        """Add one step's in-graph ``seconds`` to the light (0) or full (1) step totals."""
        kind = tf.reshape(tf.cast(full, tf.int32), [1, 1])
        self.step_seconds.scatter_nd_add(kind, tf.reshape(tf.cast(seconds, tf.float64), [1]))
        self.step_counts.scatter_nd_add(kind, tf.ones([1], tf.float64))

    def refresh_from_step(self, idx: tf.Tensor, y: tf.Tensor, weights: tf.Tensor,
                          y_pred: tf.Tensor, cache: tuple[tf.Tensor, tf.Tensor] | None,
                          full: tf.Tensor | None = None) -> tf.Tensor:
        """``refresh="free"``: new priorities of the step's batch from its own forward pass.

        Runs only on full steps (``full``; default: always). Returns the number of full steps
        so far (a tensor to wait on).

        Args:
            idx: int32 [B], the batch's local indices.
            y: the batch's targets.
            weights: float32 [B], the loss weights (ḡ update: Σ w_i g_i / Σ w_i).
            y_pred: the training forward's output (used for ``LossScorer`` priorities).
            cache: ``(a, z)`` last-layer features and pre-activations of the forward pass, or
                ``None`` when the scorer needs no gradient.
            full: bool [], whether this step does the bookkeeping (:meth:`is_full_step`).
        """
        def bookkeeping() -> tf.Tensor:
            self._bookkeeping(idx, y, weights, y_pred, cache)
            return self.bookkeeping_steps.assign_add(1)

        if full is None:
            return bookkeeping()
        return tf.cond(full, bookkeeping, self.bookkeeping_steps.read_value)

    def _bookkeeping(self, idx: tf.Tensor, y: tf.Tensor, weights: tf.Tensor,
                     y_pred: tf.Tensor, cache: tuple[tf.Tensor, tf.Tensor] | None) -> None:
        """Scores of the batch, their scatter into the table, τ (``adaptive``) and ḡ."""
        total = tf.reduce_sum(weights)
        if cache is None:
            losses = self.loss_fn(y, tf.stop_gradient(y_pred))
            zeros = tf.zeros_like(losses)
            scores = _per_example.Scores(zeros, zeros, losses, [])
        else:
            scores = self.scorer.scores_from(cache[0], cache[1], y, self.gbar,
                                             tf.math.divide_no_nan(weights, total))
        # Only the examples that were trained on (``global`` also forwards unselected
        # candidates, weight 0): then P ranks store exactly what one process would.
        self.store(idx, scores, weights > 0.0)
        if self.selection == "adaptive":
            self._decide(switch.sample_variance_terms(
                self._norm_proxy(priorities.priority_values(scores, self.priority)), weights,
                self.gamma), self.tau_momentum)
        if not self.gbar:
            return
        fraction = min(1.0, self.num_selected / self.n_local)
        new_gbar = priorities.update_gbar(self.gbar, scores.grad_sum, 1, fraction, "ema")
        for g, value in zip(self.gbar, new_gbar):
            g.assign(tf.where(total > 0.0, value, g))

    def _norm_proxy(self, p: tf.Tensor) -> tf.Tensor:
        """s = sqrt(p⁺) for ``length`` priorities, else p⁺ (the proposal's ψ)."""
        p = tf.maximum(p, 0.0)
        return tf.sqrt(p) if self.priority == "length" else p

    def _update_switch(self, p_hat: tf.Tensor, momentum: float) -> tuple[tf.Tensor, tf.Tensor]:
        """τ of the current table (summed over ranks), τ̄ and the decision; returns (τ, q)."""
        use_sqrt = self.priority == "length"
        q = _selection.importance_proposal(p_hat, self.gamma, use_sqrt)
        return self._decide(switch.variance_terms(p_hat, q, use_sqrt), momentum), q

    def _decide(self, terms: tf.Tensor, momentum: float) -> tf.Tensor:
        """τ and ĉ from this rank's ``[V_u, V_q]`` and mean step times, each summed over ranks
        (one allreduce); updates τ̄, ĉ and the decision τ̄ > max(τ_th, ĉ). Returns τ."""
        means = tf.cast(tf.math.divide_no_nan(self.step_seconds, self.step_counts), tf.float32)
        terms = tf.concat([terms, means], axis=0)
        if self.comm.size > 1:
            terms = self.comm.allreduce(terms, "sum", name="dho2/prioritized/tau_terms")
        tau = switch.tau_from_terms(terms[:2])
        tau_ema = momentum * self.tau_ema + (1.0 - momentum) * tau
        if self.cost_ratio == MEASURED:
            cost = switch.cost_ratio_from_times(terms[2], terms[3])
        else:
            cost = tf.constant(self.cost_ratio, tf.float32)
        self.tau.assign(tau)
        self.tau_ema.assign(tau_ema)
        self.cost.assign(cost)
        self.importance_on.assign(tau_ema > tf.maximum(self.tau_threshold, cost))
        return tau

    def switch_statistics(self) -> dict[str, float]:
        """``{"tau", "tau_ema", "importance_on", "cost_ratio"}`` of ``selection="adaptive"``
        (else empty)."""
        if self.selection != "adaptive" or not self.is_bound:
            return {}
        return {"tau": float(self.tau.numpy()), "tau_ema": float(self.tau_ema.numpy()),
                "importance_on": float(self.importance_on.numpy()),
                "cost_ratio": float(self.cost.numpy())}

    def estimated_priorities(self) -> tf.Tensor:
        """p̂_i(t) of every example of the shard at the current step: float32 [n_j]."""
        return staleness.estimate_priorities(self.table, self.step, self.estimator)

    def select(self, full: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        """This step's examples and loss weights ``(idx int32 [B], weights float32 [B])``.

        ``B`` is K_j, or C_j = min(K, n_j) for ``global`` (unselected candidates weigh 0).
        ``full`` (bool [], default: always) marks the steps that draw by the selection rule;
        the others (light steps, see the class docstring) draw K_j uniform indices.
        """
        if full is None or not self.has_light_steps:
            idx, weights = self._select_full()
        else:
            seed = self.rng.make_seeds(1)[:, 0]
            idx, weights = tf.cond(full, lambda: self._select_full(seed),
                                   lambda: _selection.draw_uniform(self.n_local,
                                                                   self.num_selected, seed))
        self.evaluations.assign_add(tf.size(idx, out_type=tf.int64))
        return idx, weights

    def _select_full(self, seed: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        """The selection rule's ``(idx, weights)`` (``seed``: of the random draws)."""
        if seed is None and self.selection in ("importance", "adaptive", "pool"):
            seed = self.rng.make_seeds(1)[:, 0]
        p_hat = self.estimated_priorities()
        if self.selection == "topk":
            idx, weights = _selection.select_topk(p_hat, self.num_selected)
        elif self.selection == "importance":
            idx, weights = _selection.select_importance(
                p_hat, self.num_selected, self.gamma, self.priority == "length", seed,
                self.max_weight)
        elif self.selection == "adaptive":
            if self.refresh_mode == "free":  # τ̄ comes from the previous steps' fresh scores
                q = _selection.importance_proposal(p_hat, self.gamma, self.priority == "length")
            else:
                _, q = self._update_switch(p_hat, self.tau_momentum)
            uniform = tf.fill(tf.shape(q), 1.0 / self.n_local)
            idx, weights = _selection.draw(tf.where(self.importance_on, q, uniform),
                                           self.num_selected, seed, self.max_weight)
        elif self.selection == "pool":
            pool = _selection.uniform_pool(self.n_local, self.pool_size, seed)
            scores = self._forward(tf.gather(self.x, pool), tf.gather(self.y, pool), [])
            if self.priority == "loss":
                self.store(pool, scores)  # the pool's losses are fresh priorities too
            idx, weights = _selection.select_pool_topk(pool, scores.loss, self.num_selected)
        else:
            idx, weights = _selection.select_global_topk(
                p_hat, self.shard_sizes, self.num_selected_total, self.comm.rank, self.comm)
        return idx, weights

    def training_batch(self, idx: tf.Tensor, weights: tf.Tensor, refreshed: tf.Tensor
                       ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """``(x, y, weights)`` of the step; with ``aggregate_report`` the refresh set is added."""
        if self.aggregate_report:
            idx = tf.concat([idx, refreshed], axis=0)
            weights = tf.concat([weights, tf.fill([self.num_refreshed],
                                                  1.0 / self.num_refreshed)], axis=0)
            self.evaluations.assign_add(self.num_refreshed)
        return tf.gather(self.x, idx), tf.gather(self.y, idx), weights

    def advance(self) -> None:
        """Advance the step counter, t ← t + 1 (once per training step, after the update)."""
        self.step.assign_add(1)

