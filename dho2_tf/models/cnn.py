"""A small batch-norm-free CNN: two (convolution 5 + ReLU + max-pool 2) blocks, then logits.

The model of the prioritized-SGD experiments, also one of DHO2's drop-in benchmark tasks. 2-D
convolutions for 28 × 28 images (784 features, e.g. MNIST), 1-D ones over the flattened input
otherwise.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf

from dho2_tf.models.resnet import check_input_shape, check_num_classes, kernel_regularizer


def small_cnn(input_shape: Sequence[int], num_classes: int, weight_decay: float = 0.0,
              name: str | None = None) -> tf.keras.Model:
    """Conv(16, 5) → ReLU → MaxPool(2) → Conv(32, 5) → ReLU → MaxPool(2) → Dense logits.

    Args:
        input_shape: shape of one example (flattened first).
        num_classes: number of logits.
        weight_decay: SGD weight decay on the kernels (0 disables it; see
            :func:`models.resnet.kernel_regularizer`).
        name: model name (``small_cnn_2d`` for 28 × 28 inputs, else ``small_cnn``).

    Returns:
        An uncompiled model mapping ``float32 [B, *input_shape]`` to logits
        ``float32 [B, num_classes]``.
    """
    check_input_shape(input_shape)
    check_num_classes(num_classes)
    layers, reg = tf.keras.layers, kernel_regularizer(weight_decay)
    features = int(np.prod(input_shape))
    two_d = features == 28 * 28
    conv, pool = (layers.Conv2D, layers.MaxPool2D) if two_d else (layers.Conv1D,
                                                                  layers.MaxPool1D)
    return tf.keras.Sequential([
        tf.keras.Input(tuple(input_shape)),
        layers.Reshape((28, 28, 1) if two_d else (features, 1)),
        conv(16, 5, padding="same", activation="relu", kernel_regularizer=reg), pool(2),
        conv(32, 5, padding="same", activation="relu", kernel_regularizer=reg), pool(2),
        layers.Flatten(), layers.Dense(num_classes, kernel_regularizer=reg, name="logits")],
        name=name or ("small_cnn_2d" if two_d else "small_cnn"))
