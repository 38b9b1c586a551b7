"""What a model is trained to do: its targets, its loss and its metrics.

A classifier (every model but the autoencoder) maps inputs to class logits and is trained on
the labels with softmax cross-entropy, reporting accuracy. An autoencoder reconstructs its
input: the targets are the inputs, the outputs are the logits of per-pixel Bernoulli
probabilities and the loss is the sigmoid cross-entropy averaged over the pixels; there is no
accuracy. The registry stores each model's objective (``models.objective(name)``) so that the
training code never branches on a model's name.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Objective:
    """A training objective.

    Attributes:
        name: short name (``"classification"``, ``"reconstruction"``).
        targets_are_inputs: the targets are the inputs themselves (reconstruction).
        loss: factory of the Keras loss ``loss(targets, model_output)`` (a fresh instance per
            call, so two compiled models never share one).
        metrics: Keras metric names compiled with the model (``("accuracy",)`` or none).
    """

    name: str
    targets_are_inputs: bool
    loss: Callable[[], tf.keras.losses.Loss]
    metrics: tuple[str, ...] = ()

    @property
    def has_accuracy(self) -> bool:
        """Whether the compiled model reports an accuracy."""
        return "accuracy" in self.metrics

    def targets(self, x: Any, y: Any) -> Any:
        """The training targets of inputs ``x`` with labels ``y``: ``x`` or ``y``."""
        return x if self.targets_are_inputs else y

    def make_loss(self) -> tf.keras.losses.Loss:
        """A new instance of the loss."""
        return self.loss()


CLASSIFICATION = Objective(
    "classification", targets_are_inputs=False,
    loss=functools.partial(tf.keras.losses.SparseCategoricalCrossentropy, from_logits=True),
    metrics=("accuracy",))
"""Labels as targets, softmax cross-entropy of the logits, accuracy."""

RECONSTRUCTION = Objective(
    "reconstruction", targets_are_inputs=True,
    loss=functools.partial(tf.keras.losses.BinaryCrossentropy, from_logits=True))
"""Inputs (in [0, 1]) as targets, mean sigmoid cross-entropy of the logits, no accuracy."""
