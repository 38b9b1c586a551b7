"""A small 1-D ResNet-(6n+2) for sequence data such as MNIST-1D (40 samples, one channel).

Same layout as :func:`models.resnet.resnet` with Conv1D layers: a width-3 stem convolution, three
stages of ``n`` basic blocks with ``width``, ``2·width`` and ``4·width`` filters (stride 2 at
the start of stages 2 and 3), option-A zero-padding shortcuts, global average pooling and Dense
logits. The default (depth 8, width 20) has 40,470 parameters (39,870 trainable).
"""

from __future__ import annotations

import logging
from typing import Sequence

import tensorflow as tf

from dho2_tf.models.resnet import blocks_per_stage, check_num_classes, kernel_regularizer, residual_stages

logger = logging.getLogger(__name__)


def resnet1d(input_shape: Sequence[int] = (40,), num_classes: int = 10, depth: int = 8,
             width: int = 20, weight_decay: float = 0.0,
             name: str | None = None) -> tf.keras.Model:
    """1-D ResNet-``depth`` with batch normalization and logits output.

    Args:
        input_shape: ``(L,)`` (reshaped to ``(L, 1)``) or ``(L, C)``.
        num_classes: number of logits.
        depth: 6n+2 (8 gives one block per stage).
        width: filters of the first stage; stages 2 and 3 use ``2·width`` and ``4·width``.
        weight_decay: SGD weight decay on conv and Dense kernels (0 disables it).
        name: model name (``"resnet1d_{depth}"`` by default).

    Returns:
        An uncompiled functional ``tf.keras.Model`` mapping ``float32 [B, *input_shape]`` to
        ``float32 [B, num_classes]`` logits.

    Raises:
        ValueError: on a bad ``input_shape``, ``num_classes``, ``depth``, ``width`` or
            ``weight_decay``.
    """
    n = blocks_per_stage(depth)
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) not in (1, 2) or min(input_shape) <= 0:
        raise ValueError(
            f"`input_shape` must be (length,) or (length, channels). "
            f"Received: input_shape={input_shape}")
    if isinstance(width, bool) or not isinstance(width, int) or width <= 0:
        raise ValueError(f"`width` must be a positive integer. Received: width={width}")
    check_num_classes(num_classes)
    regularizer = kernel_regularizer(weight_decay)
    inputs = tf.keras.Input(shape=input_shape, name="sequence")
    x = inputs
    if len(input_shape) == 1:
        x = tf.keras.layers.Reshape((input_shape[0], 1), name="add_channel")(x)
    x = tf.keras.layers.Conv1D(width, 3, padding="same", use_bias=False,
                               kernel_initializer="he_normal", kernel_regularizer=regularizer,
                               name="stem_conv")(x)
    x = tf.keras.layers.BatchNormalization(name="stem_bn")(x)
    x = tf.keras.layers.ReLU(name="stem_relu")(x)
    x = residual_stages(x, n, (width, 2 * width, 4 * width), conv=tf.keras.layers.Conv1D,
                        regularizer=regularizer)
    x = tf.keras.layers.GlobalAveragePooling1D(name="pool")(x)
    outputs = tf.keras.layers.Dense(num_classes, kernel_initializer="he_normal",
                                    kernel_regularizer=regularizer, name="logits")(x)
    return tf.keras.Model(inputs, outputs, name=name or f"resnet1d_{depth}")
