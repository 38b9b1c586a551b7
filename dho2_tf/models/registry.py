"""Name → model builder registry used by the jobs (``models.get("resnet20", ...)``).

A builder is any callable ``builder(input_shape, num_classes, **kwargs) -> tf.keras.Model``
that returns an uncompiled model with logits output. Each name also has a training
:class:`~models.objectives.Objective` (``objective(name)``): classification on the labels for
every model except ``"autoencoder"``, which reconstructs its input.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import tensorflow as tf

from dho2_tf.models.autoencoder import autoencoder
from dho2_tf.models.cnn import small_cnn
from dho2_tf.models.logistic_regression import logistic_regression
from dho2_tf.models.mlp import mlp
from dho2_tf.models.objectives import CLASSIFICATION, RECONSTRUCTION, Objective
from dho2_tf.models.resnet import resnet20, resnet32, resnet56, resnet110
from dho2_tf.models.resnet1d import resnet1d

logger = logging.getLogger(__name__)

Builder = Callable[..., tf.keras.Model]

_BUILDERS: dict[str, Builder] = {
    "mlp": mlp,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet1d": resnet1d,
    "logreg": logistic_regression,
    "autoencoder": autoencoder,
    "cnn": small_cnn,
}
# Models whose objective is not CLASSIFICATION.
_OBJECTIVES: dict[str, Objective] = {"autoencoder": RECONSTRUCTION}


def available() -> list[str]:
    """Sorted names accepted by :func:`get`."""
    return sorted(_BUILDERS)


def register(name: str, builder: Builder, *, objective: Objective = CLASSIFICATION,
             overwrite: bool = False) -> None:
    """Make ``builder`` available as ``get(name, ...)``, trained with ``objective``.

    Args:
        name: registry key (a non-empty string).
        builder: ``builder(input_shape, num_classes, **kwargs) -> tf.keras.Model``.
        objective: what the model is trained on (targets, loss, metrics).
        overwrite: allow replacing an existing entry.

    Raises:
        ValueError: on an empty name, or a name already registered without ``overwrite``.
        TypeError: if ``builder`` is not callable or ``objective`` is not an ``Objective``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"`name` must be a non-empty string. Received: name={name!r}")
    if not callable(builder):
        raise TypeError(f"`builder` must be callable. Received: builder={builder!r}")
    if not isinstance(objective, Objective):
        raise TypeError(f"`objective` must be a models.Objective. Received: "
                        f"objective={objective!r}")
    if name in _BUILDERS and not overwrite:
        raise ValueError(
            f"Model {name!r} is already registered; pass overwrite=True to replace it. "
            f"Registered: {available()}")
    _BUILDERS[name] = builder
    if objective is CLASSIFICATION:
        _OBJECTIVES.pop(name, None)
    else:
        _OBJECTIVES[name] = objective


def objective(name: str) -> Objective:
    """The training objective of the model registered as ``name``.

    Raises:
        ValueError: if ``name`` is not registered (the message lists the valid names).
    """
    _check_name(name)
    return _OBJECTIVES.get(name, CLASSIFICATION)


def _check_name(name: str) -> None:
    if name not in _BUILDERS:
        raise ValueError(f"`name` must be one of {available()}. Received: name={name!r}")


def get(name: str, input_shape: Sequence[int], num_classes: int,
        **kwargs: Any) -> tf.keras.Model:
    """Build the uncompiled model registered as ``name``.

    Args:
        name: one of :func:`available`.
        input_shape: shape of one example, e.g. ``(40,)`` or ``(32, 32, 3)``.
        num_classes: number of logits (a reconstruction model's output has the input's size).
        **kwargs: passed to the builder (e.g. ``weight_decay``, ``hidden``, ``width``).

    Returns:
        The model.

    Raises:
        ValueError: if ``name`` is not registered (the message lists the valid names).
        TypeError: if the builder does not accept a keyword in ``kwargs``.
    """
    _check_name(name)
    model = _BUILDERS[name](input_shape, num_classes, **kwargs)
    logger.info("Built model %s: %d parameters", name, model.count_params())
    return model
