"""Priority definitions and the running full-gradient estimate ḡ.

See :class:`dho2_tf.prioritized.PrioritizedSampler` for the equations (reference
docs/algorithm.md §9.2, §9.3):

* ``length``: p_i = ‖g_i‖²;  ``projection``: p_i = ⟨g_i, ḡ⟩;  ``loss``: p_i = ℓ_i.
* ḡ ← (1−f)·ḡ + f·G_ref/R (``ema``) or ḡ ← f(1−f)·ḡ + f·G_ref (``as_released``), f = R/n_j.
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from dho2_tf.prioritized.per_example import Scores

PRIORITIES = ("length", "projection", "loss")
GBAR_UPDATES = ("ema", "as_released")


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else a ValueError naming ``name`` and the choices."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {tuple(choices)}. Received: {name}={value!r}")
    return value


def needs_gradients(*priorities: str) -> bool:
    """Whether any of ``priorities`` needs per-example gradients (everything but ``loss``)."""
    return any(p != "loss" for p in priorities)


def priority_values(scores: Scores, priority: str) -> tf.Tensor:
    """The ``priority`` column of ``scores``: float32 [B]."""
    if priority == "length":
        return scores.length
    if priority == "projection":
        return scores.projection
    if priority == "loss":
        return scores.loss
    raise ValueError(f"`priority` must be one of {PRIORITIES}. Received: priority={priority!r}")


def update_gbar(gbar: Sequence[tf.Tensor], grad_sum: Sequence[tf.Tensor], num_refreshed: int,
                fraction: float, gbar_update: str) -> list[tf.Tensor]:
    """ḡ after a refresh of ``num_refreshed`` = R points with gradient sum G_ref.

    Args:
        gbar: current ḡ, one tensor per variable.
        grad_sum: G_ref = Σ_{refreshed} g_i, same structure.
        num_refreshed: R.
        fraction: f = R / n_j.
        gbar_update: ``"ema"`` (intended) or ``"as_released"`` (the released code's formula).

    Returns:
        The new ḡ.
    """
    if gbar_update == "ema":
        return [(1.0 - fraction) * g + (fraction / num_refreshed) * s
                for g, s in zip(gbar, grad_sum)]
    return [fraction * (1.0 - fraction) * g + fraction * s for g, s in zip(gbar, grad_sum)]
