"""Multi-layer perceptron; the default is the MNIST-1D reference MLP (40→100→100→10, ReLU)."""

from __future__ import annotations

import logging
from typing import Sequence

import tensorflow as tf

from dho2_tf.models.resnet import check_input_shape, check_num_classes, kernel_regularizer

logger = logging.getLogger(__name__)


def mlp(input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (100, 100),
        activation: str = "relu", weight_decay: float = 0.0,
        name: str = "mlp") -> tf.keras.Model:
    """Fully connected network with logits output (no softmax).

    With ``input_shape=(40,)``, ``num_classes=10`` and the defaults this is the MNIST-1D
    reference MLP (Greydanus 2020, arXiv:2011.14439): 40→100→100→10, 15,310 parameters.

    Args:
        input_shape: shape of one example; inputs of rank > 1 are flattened first.
        num_classes: number of logits.
        hidden: widths of the hidden Dense layers (may be empty: a linear model).
        activation: Keras activation of the hidden layers.
        weight_decay: SGD weight decay on the Dense kernels (0 disables it; see
            :func:`models.resnet.kernel_regularizer`).
        name: model name.

    Returns:
        An uncompiled ``tf.keras.Sequential`` mapping ``float32 [B, *input_shape]`` to
        ``float32 [B, num_classes]`` logits.

    Raises:
        ValueError: on a bad ``input_shape``, ``num_classes``, ``hidden`` or ``weight_decay``.
    """
    input_shape = check_input_shape(input_shape)
    hidden = tuple(hidden)
    if any(isinstance(h, bool) or not isinstance(h, int) or h <= 0 for h in hidden):
        raise ValueError(f"`hidden` must contain positive integers. Received: hidden={hidden}")
    check_num_classes(num_classes)
    return tf.keras.Sequential(dense_stack(input_shape, hidden, num_classes, activation,
                                           weight_decay), name=name)


def dense_stack(input_shape: tuple[int, ...], hidden: tuple[int, ...], outputs: int,
                activation: str, weight_decay: float) -> list[tf.keras.layers.Layer]:
    """Layers ``h_0 = flatten(x)``, ``h_i = activation(h_{i-1} W_i + b_i)``, logits
    ``h_L W + b`` of width ``outputs``: the body shared by :func:`mlp` and
    :func:`models.autoencoder.autoencoder` (arguments already validated).
    """
    regularizer = kernel_regularizer(weight_decay)
    layers: list[tf.keras.layers.Layer] = [tf.keras.Input(shape=input_shape, name="features")]
    if len(input_shape) > 1:
        layers.append(tf.keras.layers.Flatten(name="flatten"))
    for i, units in enumerate(hidden):
        layers.append(tf.keras.layers.Dense(units, activation=activation,
                                            kernel_regularizer=regularizer, name=f"dense{i + 1}"))
    layers.append(tf.keras.layers.Dense(outputs, kernel_regularizer=regularizer, name="logits"))
    return layers
