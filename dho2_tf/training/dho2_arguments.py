"""DHO2's section of a training configuration: the optimizer's constructor arguments.

A run's configuration (:class:`~dho2_tf.training.experiment.TrainConfig`) keeps DHO2's arguments
in one section, :class:`DHO2Arguments`, whose defaults are read from :class:`dho2_tf.DHO2`'s
signature, so ``jobs/train.py`` and ``DHO2()`` have one set of defaults. The section holds the
arguments as given (``warmup=None`` stays ``None``); :class:`dho2_tf.DHO2` resolves them into
its :class:`~dho2_tf.hyperparameters.Hyperparameters` (``warmup`` = ``refresh_every``,
``lanczos_order`` = 4(k+ℓ), ...) when the optimizer is built, so a later flag can still change
``refresh_every`` and the defaults that follow it.

Three DHO2 arguments are not in the section but top-level fields of the run, because they also
configure the rest of it: ``learning_rate`` and ``momentum`` (the baselines'), and ``seed``
(weights and data order).

Where a configuration comes from a file, DHO2's arguments may be written in a nested ``dho2:``
mapping, as top-level keys (``k: 16``), or under ``dho2_options:`` (the older spelling); a key
set in two of these places is an error. Checkpoints written before the section existed recorded
the top-level keys ``k``, ``alpha``, ... and ``dho2_options.<name>``; :func:`upgrade_run_record`
maps them onto the section's keys, so those checkpoints still resume.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Mapping

from dho2_tf.optimizer import DHO2
from dho2_tf.training.config_values import coerce, field_types

#: DHO2 arguments that are top-level fields of a run configuration, not in the section.
RUN_LEVEL_ARGUMENTS = ("learning_rate", "momentum", "seed")
#: The section's key in a configuration mapping, and the older key of further DHO2 arguments.
SECTION_KEY, OLDER_SECTION_KEY = "dho2", "dho2_options"
#: The DHO2 arguments checkpoints recorded as top-level keys before the section existed.
FORMERLY_TOP_LEVEL = ("base", "k", "ell", "alpha", "c_max", "lanczos_order", "refresh_every",
                      "warmup", "mode")


def dho2_defaults() -> dict[str, Any]:
    """Every keyword argument of :class:`dho2_tf.DHO2` with its default, read from its signature:
    the one set of defaults of DHO2 and of a run configuration."""
    return {name: p.default for name, p in inspect.signature(DHO2.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


DHO2_DEFAULTS = dho2_defaults()
_D = DHO2_DEFAULTS


@dataclasses.dataclass(frozen=True)
class DHO2Arguments:
    """DHO2's constructor arguments but ``learning_rate``, ``momentum``, ``seed`` and ``comm``,
    each under its own name with DHO2's default (their meaning: :class:`dho2_tf.DHO2`).

    Build one from a mapping with ``DHO2Arguments().updated(values)`` (types coerced, unknown
    keys refused), or directly: ``DHO2Arguments(k=16, refresh_every=200)``. Values are checked when the optimizer
    is built (:meth:`TrainConfig.validate` builds one before any data is loaded).
    """

    base: str = _D["base"]
    k: int = _D["k"]
    ell: int = _D["ell"]
    alpha: float = _D["alpha"]
    c_max: float | None = _D["c_max"]
    lanczos_order: int | None = _D["lanczos_order"]
    lanczos_dtype: str | None = _D["lanczos_dtype"]
    hvp_method: str = _D["hvp_method"]
    refresh_method: str = _D["refresh_method"]
    warm_extra: int = _D["warm_extra"]
    block_hvp: str = _D["block_hvp"]
    refresh_every: int = _D["refresh_every"]
    warmup: int | None = _D["warmup"]
    max_refresh_every: int | None = _D["max_refresh_every"]
    staleness_tol: float = _D["staleness_tol"]
    eigenvalue_damping: float = _D["eigenvalue_damping"]
    beta_1: float = _D["beta_1"]
    beta_2: float = _D["beta_2"]
    epsilon: float = _D["epsilon"]
    mode: str = _D["mode"]
    window_rule: str | None = _D["window_rule"]
    window_sigma: float = _D["window_sigma"]
    curvature_ranks: int = _D["curvature_ranks"]
    update_ranks: int | None = _D["update_ranks"]
    delivery_delay: int | None = _D["delivery_delay"]
    rho: float = _D["rho"]
    tau: int = _D["tau"]
    x_restart: str = _D["x_restart"]
    nonfinite: str = _D["nonfinite"]
    max_consecutive_skips: int = _D["max_consecutive_skips"]
    memory_budget: int = _D["memory_budget"]
    guard: float = _D["guard"]

    @classmethod
    def field_types(cls) -> dict[str, str]:
        """Argument name → annotation string (``"int"``, ``"float | None"``, ...)."""
        return field_types(cls)

    def keywords(self) -> dict[str, Any]:
        """The arguments as ``DHO2(**keywords)`` takes them."""
        return dataclasses.asdict(self)

    def updated(self, values: Mapping[str, Any], source: str = "config") -> "DHO2Arguments":
        """A copy with ``values`` (argument name → value, types coerced) replacing fields.

        Raises:
            ValueError: on a name that is not a field (the message lists the valid ones, and
                says where ``learning_rate``, ``momentum`` and ``seed`` go) or a value that does
                not convert to the field's type.
        """
        types = self.field_types()
        out = {}
        for name, value in values.items():
            if name not in types:
                hint = (f" `{name}` is a top-level key of the run (it also sets the baselines "
                        "or the data order)." if name in RUN_LEVEL_ARGUMENTS else "")
                raise ValueError(f"Unknown DHO2 argument {name!r} in {source}.{hint} Valid "
                                 f"DHO2 arguments: {', '.join(sorted(types))}")
            out[name] = coerce(name, types[name], value)
        return dataclasses.replace(self, **out)


ARGUMENT_NAMES = tuple(DHO2Arguments.field_types())


def split_section(values: Mapping[str, Any], source: str
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(the other keys, DHO2's arguments)`` of a configuration mapping.

    DHO2's arguments are gathered from the nested ``dho2`` mapping (or
    :class:`DHO2Arguments`), from top-level keys named
    like one (:data:`ARGUMENT_NAMES`) and from the older ``dho2_options`` mapping. Keys may use
    ``-`` or ``_``.

    Raises:
        ValueError: when ``dho2``/``dho2_options`` is not a mapping, or one argument is set in
            two places (the message names both).
    """
    rest: dict[str, Any] = {}
    arguments: dict[str, Any] = {}
    origins: dict[str, str] = {}

    def add(name: str, value: Any, origin: str) -> None:
        if name in arguments:
            raise ValueError(f"DHO2's `{name}` is set twice in {source}: {origins[name]}="
                             f"{arguments[name]!r} and {origin}={value!r}. Set it once.")
        arguments[name], origins[name] = value, origin

    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        if key in (SECTION_KEY, OLDER_SECTION_KEY):
            if value is None:
                continue
            if isinstance(value, DHO2Arguments):
                value = value.keywords()
            if not isinstance(value, Mapping):
                raise ValueError(f"`{key}` in {source} must be a mapping of DHO2 arguments to "
                                 f"values. Received: {key}={value!r}")
            for inner, inner_value in value.items():
                name = str(inner).replace("-", "_")
                add(name, inner_value, f"{key}.{name}")
        elif key in ARGUMENT_NAMES:
            add(key, value, key)
        else:
            rest[key] = value
    return rest, arguments


def upgrade_run_record(run: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's run fingerprint with DHO2's arguments under the section's keys.

    A record written before the section existed holds ``k``, ``alpha``, ... (the
    :data:`FORMERLY_TOP_LEVEL` arguments) as top-level keys, ``dho2_options.<name>`` for the
    arguments set explicitly, and nothing for the others, which had DHO2's defaults. The
    upgraded record holds ``dho2.<name>`` for every argument. A record that already has
    ``dho2.`` keys is returned unchanged.
    """
    if any(key.startswith(SECTION_KEY + ".") for key in run):
        return dict(run)
    older = OLDER_SECTION_KEY + "."
    out: dict[str, Any] = {}
    for key, value in run.items():
        if key in FORMERLY_TOP_LEVEL:
            out[f"{SECTION_KEY}.{key}"] = value
        elif key.startswith(older):
            out[f"{SECTION_KEY}.{key[len(older):]}"] = value
        else:
            out[key] = value
    for name, default in DHO2Arguments().keywords().items():
        out.setdefault(f"{SECTION_KEY}.{name}", default)
    return out
