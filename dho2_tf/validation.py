"""Argument checks shared by every public constructor, with Keras-style messages."""

from __future__ import annotations

import numbers


def check_int(name: str, value: object, *, minimum: int | None = None,
              maximum: int | None = None, hint: str = "") -> int:
    """``value`` as an int, or a ValueError naming ``name``, the allowed range and the value.

    Example message: "`k` must be a positive integer. Received: k=0".
    """
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    ok = ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        kind = {0: "a non-negative integer", 1: "a positive integer"}.get(
            minimum, "an integer") if maximum is None else "an integer"  # type: ignore[arg-type]
        raise ValueError(f"`{name}` must be {kind}{_range(minimum, maximum)}"
                         f"{' (' + hint + ')' if hint else ''}. Received: {name}={value!r}")
    return int(value)  # type: ignore[arg-type]


def check_real(name: str, value: object, *, minimum: float | None = None,
               maximum: float | None = None, open_min: bool = False,
               open_max: bool = False) -> float:
    """``value`` as a finite float in the range, or a ValueError naming ``name``."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        v = float(value)  # type: ignore[arg-type]
        ok = v == v and abs(v) != float("inf")
        if minimum is not None:
            ok = ok and (v > minimum if open_min else v >= minimum)
        if maximum is not None:
            ok = ok and (v < maximum if open_max else v <= maximum)
    if not ok:
        lo = "" if minimum is None else ("(" if open_min else "[") + f"{minimum}"
        hi = "" if maximum is None else f"{maximum}" + (")" if open_max else "]")
        where = f" in {lo or '(-inf'}, {hi or 'inf)'}"
        raise ValueError(f"`{name}` must be a finite number{where}. Received: {name}={value!r}")
    return float(value)  # type: ignore[arg-type]


def _range(minimum: int | None, maximum: int | None) -> str:
    if maximum is None and minimum in (0, 1):
        return ""
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None:
        return f" >= {minimum}"
    if maximum is not None:
        return f" <= {maximum}"
    return ""
