"""Fully connected autoencoder; the default is FOSI's MNIST autoencoder 784-512-128-32-128-512-784.

The network maps an input x (flattened to d values in [0, 1]) through Dense layers with tanh
activations to a code and back to d linear outputs z, the logits of per-pixel Bernoulli
probabilities sigmoid(z). It is trained to reconstruct its input with the sigmoid
cross-entropy ``mean_i [ -x_i log σ(z_i) - (1 - x_i) log(1 - σ(z_i)) ]``
(:data:`models.objectives.RECONSTRUCTION`), as in FOSI (Sivan et al., ICLR 2024,
arXiv:2302.08484). With d = 784 it has 944,176 parameters (0.94M).
"""

from __future__ import annotations

import math
from typing import Sequence

import tensorflow as tf

from dho2_tf.models.mlp import dense_stack
from dho2_tf.models.resnet import check_input_shape, check_num_classes

HIDDEN = (512, 128, 32, 128, 512)


def autoencoder(input_shape: Sequence[int], num_classes: int | None = None,
                hidden: Sequence[int] = HIDDEN, activation: str = "tanh",
                weight_decay: float = 0.0, name: str = "autoencoder") -> tf.keras.Model:
    """Dense autoencoder with logits output of the input's size.

    Args:
        input_shape: shape of one example; flattened to ``d = prod(input_shape)`` values.
        num_classes: unused (the output size is the input size); accepted so that the builder
            has the registry's signature. If given it must be an integer >= 2.
        hidden: widths of the hidden Dense layers, encoder and decoder (non-empty).
        activation: Keras activation of the hidden layers.
        weight_decay: L2 penalty on the kernels as SGD weight decay (0 disables it; see
            :func:`models.resnet.kernel_regularizer`).
        name: model name.

    Returns:
        An uncompiled model mapping ``float32 [B, *input_shape]`` to reconstruction logits of
        the same shape.

    Raises:
        ValueError: on a bad ``input_shape``, ``num_classes``, ``hidden`` or ``weight_decay``.
    """
    input_shape = check_input_shape(input_shape)
    hidden = tuple(hidden)
    if not hidden or any(isinstance(h, bool) or not isinstance(h, int) or h <= 0
                         for h in hidden):
        raise ValueError(
            f"`hidden` must be a non-empty sequence of positive integers. Received: "
            f"hidden={hidden}")
    if num_classes is not None:
        check_num_classes(num_classes)
    layers = dense_stack(input_shape, hidden, math.prod(input_shape), activation, weight_decay)
    if len(input_shape) > 1:
        layers.append(tf.keras.layers.Reshape(input_shape, name="unflatten"))
    return tf.keras.Sequential(layers, name=name)
