"""DHO2's hyper-parameters: validated once, before any variable or collective exists.

Every field is a constructor argument of :class:`dho2_tf.DHO2` under the same name (its meaning
is documented there); ``None`` defaults are resolved here, so the fields hold the values in use.
"""

from __future__ import annotations

import dataclasses

from dho2_tf.curvature.block_ops import check_block_hvp
from dho2_tf.curvature.hvp import check_hvp_method
from dho2_tf.curvature.warm_start import REFRESH_METHODS
from dho2_tf.modes import check_mode_options
from dho2_tf.validation import check_int, check_real

NONFINITE_POLICIES = ("skip", "raise")

#: Default ``memory_budget`` of ``mode="auto"``: 1 GiB of replicated state per rank.
DEFAULT_MEMORY_BUDGET = 1 << 30


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    """The optimizer's configuration besides the learning rate and the base rule's constants.

    Construct it with :meth:`resolve`, which checks every value and fills the defaults that
    depend on others: ``c_max`` (``None``: 1), ``lanczos_order`` = 4(k+ℓ), ``warmup`` =
    ``refresh_every``, ``window_rule`` (``"extrapolate"`` for ``faithful``, else ``"none"``),
    ``delivery_delay`` = ⌈refresh_every/2⌉.
    """

    k: int
    ell: int
    alpha: float
    c_max: float
    lanczos_order: int
    lanczos_dtype: str | None
    hvp_method: str
    refresh_method: str
    warm_extra: int
    block_hvp: str
    refresh_every: int
    warmup: int
    max_refresh_every: int | None
    staleness_tol: float
    eigenvalue_damping: float
    mode: str
    memory_budget: int
    window_rule: str
    window_sigma: float
    curvature_ranks: int
    update_ranks: int | None
    delivery_delay: int
    rho: float
    tau: int
    x_restart: str
    nonfinite: str
    max_consecutive_skips: int
    seed: int
    guard: float = 1.5

    @property
    def num_pairs(self) -> int:
        """K = k + ℓ."""
        return self.k + self.ell

    @classmethod
    def resolve(cls, *, k: int, ell: int, alpha: float,
                c_max: float | None, lanczos_order: int | None, lanczos_dtype: str | None,
                hvp_method: str, refresh_method: str, warm_extra: int, block_hvp: str,
                refresh_every: int, warmup: int | None, max_refresh_every: int | None,
                staleness_tol: float, eigenvalue_damping: float, mode: str, memory_budget: int,
                window_rule: str | None, window_sigma: float, curvature_ranks: int,
                update_ranks: int | None, delivery_delay: int | None, rho: float, tau: int,
                x_restart: str, nonfinite: str, max_consecutive_skips: int,
                seed: int, guard: float = 1.5) -> "Hyperparameters":
        """Check every argument (ValueError naming the first bad one) and fill the defaults."""
        k = check_int("k", k, minimum=1)
        ell = check_int("ell", ell, minimum=0)
        if lanczos_dtype not in (None, "float32", "float64"):
            raise ValueError("`lanczos_dtype` must be None, 'float32' or 'float64'. "
                             f"Received: lanczos_dtype={lanczos_dtype!r}")
        refresh_every = check_int("refresh_every", refresh_every, minimum=1)
        if refresh_method not in REFRESH_METHODS:
            raise ValueError(f"`refresh_method` must be one of {REFRESH_METHODS}. "
                             f"Received: refresh_method={refresh_method!r}")
        if max_refresh_every is not None:
            max_refresh_every = check_int("max_refresh_every", max_refresh_every,
                                          minimum=refresh_every,
                                          hint="it must be at least refresh_every or None")
        rule = check_mode_options(mode, window_rule, max_refresh_every)
        if x_restart not in ("keep", "z"):
            raise ValueError(
                f"`x_restart` must be 'keep' or 'z'. Received: x_restart={x_restart!r}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"`nonfinite` must be one of {NONFINITE_POLICIES}. "
                             f"Received: nonfinite={nonfinite!r}")
        if guard != 0:   # 0 (or False) turns the divergence guard off; else its ratio κ > 1
            guard = check_real("guard", guard, minimum=1.0, open_min=True)
        return cls(
            k=k, ell=ell, alpha=check_real("alpha", alpha, minimum=0.0),
            c_max=1.0 if c_max is None else check_real("c_max", c_max, minimum=1.0),
            lanczos_order=4 * (k + ell) if lanczos_order is None else check_int(
                "lanczos_order", lanczos_order, minimum=k + ell,
                hint="it must be at least k + ell"),
            lanczos_dtype=lanczos_dtype, hvp_method=check_hvp_method(hvp_method),
            refresh_method=refresh_method,
            warm_extra=check_int("warm_extra", warm_extra, minimum=0),
            block_hvp=check_block_hvp(block_hvp), refresh_every=refresh_every,
            warmup=refresh_every if warmup is None else check_int("warmup", warmup, minimum=0),
            max_refresh_every=max_refresh_every,
            staleness_tol=check_real("staleness_tol", staleness_tol, minimum=0.0, open_min=True),
            eigenvalue_damping=check_real("eigenvalue_damping", eigenvalue_damping,
                                          minimum=0.0),
            mode=mode, memory_budget=check_int("memory_budget", memory_budget, minimum=1),
            window_rule=rule, window_sigma=check_real("window_sigma", window_sigma, minimum=0.0),
            curvature_ranks=check_int("curvature_ranks", curvature_ranks, minimum=1),
            update_ranks=None if update_ranks is None else check_int(
                "update_ranks", update_ranks, minimum=1),
            delivery_delay=-(-refresh_every // 2) if delivery_delay is None else check_int(
                "delivery_delay", delivery_delay, minimum=1, maximum=refresh_every),
            rho=check_real("rho", rho, minimum=0.0, open_min=True),
            tau=check_int("tau", tau, minimum=1), x_restart=x_restart, nonfinite=nonfinite,
            max_consecutive_skips=check_int("max_consecutive_skips", max_consecutive_skips,
                                            minimum=1),
            seed=check_int("seed", seed, minimum=0), guard=float(guard))

    def config(self) -> dict:
        """The fields as ``get_config`` entries."""
        return dataclasses.asdict(self)

    def check_fits(self, n: int) -> None:
        """ValueError unless k + ℓ ≤ n, and m ≤ n for an m other than the default 4(k + ℓ): n
        parameters have at most n eigenpairs and Lanczos vectors (the default m stops at n by
        breakdown when 4(k + ℓ) > n)."""
        checks = [("k + ell", self.k + self.ell)]
        if self.lanczos_order != 4 * (self.k + self.ell):
            checks.append(("lanczos_order", self.lanczos_order))
        for name, value in checks:
            if value > n:
                raise ValueError(f"`{name}` must not exceed the {n} trainable parameters of "
                                 f"the model. Received: k={self.k}, ell={self.ell}, "
                                 f"lanczos_order={self.lanczos_order}")


def reject_unsupported(kwargs: dict) -> dict:
    """``kwargs`` without Keras' ``weight_decay`` and ``use_ema`` when they are off; ValueError
    when one is set (weight decay belongs in the loss, so the curvature estimate sees it)."""
    for key in ("weight_decay", "use_ema"):
        if kwargs.pop(key, None):
            raise ValueError(f"`{key}` is not supported by DHO2" + (
                ": add an L2 term to the loss so the curvature estimate sees it"
                if key == "weight_decay" else "") + ".")
    return kwargs


FIELD_NAMES = frozenset(field.name for field in dataclasses.fields(Hyperparameters))
