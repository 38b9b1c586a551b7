"""Multinomial logistic regression: class logits ``Wx + b`` of the flattened input.

The predicted class probabilities are ``softmax(Wx + b)``; trained with softmax cross-entropy
this is the logistic-regression task of FOSI (Sivan et al., ICLR 2024, arXiv:2302.08484) on
MNIST (784→10: 7,850 parameters).
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from dho2_tf.models.mlp import mlp


def logistic_regression(input_shape: Sequence[int], num_classes: int,
                        weight_decay: float = 0.0, name: str = "logreg") -> tf.keras.Model:
    """A linear map from the (flattened) input to ``num_classes`` logits.

    Args:
        input_shape: shape of one example; inputs of rank > 1 are flattened first.
        num_classes: number of logits.
        weight_decay: optional L2 penalty ``(weight_decay / 2)·‖W‖²`` on the weights (not the
            bias), i.e. SGD weight decay ``weight_decay`` (0 disables it).
        name: model name.

    Returns:
        An uncompiled model mapping ``float32 [B, *input_shape]`` to logits
        ``float32 [B, num_classes]`` = ``x W + b`` (one Dense layer named ``logits``).

    Raises:
        ValueError: on a bad ``input_shape``, ``num_classes`` or ``weight_decay``.
    """
    return mlp(input_shape, num_classes, hidden=(), weight_decay=weight_decay, name=name)
