"""CIFAR-style ResNet-(6n+2) with batch normalization (He et al. 2016, §4.2).

The network is a 3×3 convolution with 16 filters, then three stages of ``n`` basic blocks with
16, 32 and 64 filters (the first block of stages 2 and 3 halves the spatial size with stride 2),
global average pooling and a Dense layer that outputs logits. Shortcuts are option A of the
paper: identity, and where the shape changes, spatial subsampling plus zero-padding of the new
channels (:class:`ZeroPadShortcut`), so shortcuts add no parameters. This gives the paper's
counts: ResNet-20 has 271,098 parameters (0.27M) and ResNet-110 1,736,058 (1.7M).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import tensorflow as tf

logger = logging.getLogger(__name__)

_STAGE_FILTERS = (16, 32, 64)


@tf.keras.utils.register_keras_serializable(package="dho2_tf")
class ZeroPadShortcut(tf.keras.layers.Layer):
    """Option-A shortcut: subsample the spatial axes by ``strides`` and zero-pad the channels.

    Works on channels-last inputs of any spatial rank (``[B, L, C]`` or ``[B, H, W, C]``). The
    extra channels are split evenly before and after the existing ones, as in the reference
    CIFAR implementations.

    Args:
        filters: number of output channels (≥ the input channels).
        strides: spatial subsampling factor (``x[:, ::strides, ..., :]``).
    """

    def __init__(self, filters: int, strides: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if filters <= 0:
            raise ValueError(f"`filters` must be a positive integer. Received: filters={filters}")
        if strides <= 0:
            raise ValueError(f"`strides` must be a positive integer. Received: strides={strides}")
        self.filters = int(filters)
        self.strides = int(strides)

    def build(self, input_shape: tf.TensorShape) -> None:
        """Check that the layer only adds channels."""
        channels = int(input_shape[-1])
        if channels > self.filters:
            raise ValueError(
                f"`filters` must be >= the input channels ({channels}). "
                f"Received: filters={self.filters}")
        super().build(input_shape)

    def call(self, x: tf.Tensor) -> tf.Tensor:
        """Subsample and pad ``x``."""
        rank = x.shape.rank
        if self.strides > 1:
            x = x[(slice(None),) + (slice(None, None, self.strides),) * (rank - 2)]
        extra = self.filters - x.shape[-1]
        if extra:
            before = extra // 2
            x = tf.pad(x, [[0, 0]] * (rank - 1) + [[before, extra - before]])
        return x

    def get_config(self) -> dict[str, Any]:
        """Constructor arguments."""
        return {**super().get_config(), "filters": self.filters, "strides": self.strides}


def kernel_regularizer(weight_decay: float) -> tf.keras.regularizers.Regularizer | None:
    """L2 penalty equivalent to SGD weight decay ``weight_decay`` (``None`` when 0).

    Note:
        Keras' ``L2(c)`` adds ``c·‖w‖²`` to the loss, whose gradient is ``2c·w``; the papers'
        weight decay λ adds ``λ·w`` to the gradient, so ``c = λ/2``.

    Raises:
        ValueError: if ``weight_decay`` is negative.
    """
    if weight_decay < 0:
        raise ValueError(
            f"`weight_decay` must be non-negative. Received: weight_decay={weight_decay}")
    return tf.keras.regularizers.L2(weight_decay / 2) if weight_decay > 0 else None


def basic_block(x: tf.Tensor, filters: int, strides: int, *, conv: Any,
                regularizer: tf.keras.regularizers.Regularizer | None, name: str) -> tf.Tensor:
    """Two 3-wide conv-BN layers plus an option-A shortcut, then ReLU.

    Args:
        x: channels-last input tensor (1-D or 2-D spatial).
        filters: output channels.
        strides: stride of the first convolution (and subsampling of the shortcut).
        conv: ``tf.keras.layers.Conv1D`` or ``Conv2D``.
        regularizer: kernel regularizer or ``None``.
        name: prefix of the layer names.

    Returns:
        The block's output tensor.
    """
    common = dict(kernel_size=3, padding="same", use_bias=False,
                  kernel_initializer="he_normal", kernel_regularizer=regularizer)
    y = conv(filters, strides=strides, name=f"{name}_conv1", **common)(x)
    y = tf.keras.layers.BatchNormalization(name=f"{name}_bn1")(y)
    y = tf.keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = conv(filters, strides=1, name=f"{name}_conv2", **common)(y)
    y = tf.keras.layers.BatchNormalization(name=f"{name}_bn2")(y)
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = ZeroPadShortcut(filters, strides, name=f"{name}_shortcut")(x)
    y = tf.keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return tf.keras.layers.ReLU(name=f"{name}_out")(y)


def residual_stages(x: tf.Tensor, n: int, stage_filters: Sequence[int], *, conv: Any,
                    regularizer: tf.keras.regularizers.Regularizer | None) -> tf.Tensor:
    """Stages of ``n`` basic blocks; every stage after the first starts with stride 2."""
    for stage, filters in enumerate(stage_filters):
        for block in range(n):
            strides = 2 if stage > 0 and block == 0 else 1
            x = basic_block(x, filters, strides, conv=conv, regularizer=regularizer,
                            name=f"stage{stage + 1}_block{block + 1}")
    return x


def blocks_per_stage(depth: int) -> int:
    """``n`` of a ResNet-(6n+2).

    Raises:
        ValueError: if ``depth`` is not of the form 6n+2 with n ≥ 1.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(
            f"`depth` must satisfy depth = 6n+2 with n >= 1 (8, 14, 20, 32, 56, 110, ...). "
            f"Received: depth={depth}")
    return (depth - 2) // 6


def resnet(depth: int, input_shape: Sequence[int], num_classes: int,
           weight_decay: float = 1e-4, name: str | None = None) -> tf.keras.Model:
    """CIFAR ResNet-``depth`` (He et al. 2016, arXiv:1512.03385 §4.2), logits output.

    Args:
        depth: 6n+2 (20, 32, 44, 56, 110, ...).
        input_shape: ``(H, W, C)`` of one image, e.g. ``(32, 32, 3)``.
        num_classes: number of logits.
        weight_decay: SGD weight decay λ on conv and Dense kernels (see
            :func:`kernel_regularizer`); 0 disables it.
        name: model name (``"resnet{depth}"`` by default).

    Returns:
        An uncompiled functional ``tf.keras.Model`` mapping ``float32 [B, H, W, C]`` to
        ``float32 [B, num_classes]`` logits.

    Raises:
        ValueError: on a bad ``depth``, ``input_shape``, ``num_classes`` or ``weight_decay``.
    """
    n = blocks_per_stage(depth)
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) != 3:
        raise ValueError(
            f"`input_shape` must be (height, width, channels). Received: input_shape={input_shape}")
    check_num_classes(num_classes)
    regularizer = kernel_regularizer(weight_decay)
    inputs = tf.keras.Input(shape=input_shape, name="image")
    x = tf.keras.layers.Conv2D(_STAGE_FILTERS[0], 3, padding="same", use_bias=False,
                               kernel_initializer="he_normal", kernel_regularizer=regularizer,
                               name="stem_conv")(inputs)
    x = tf.keras.layers.BatchNormalization(name="stem_bn")(x)
    x = tf.keras.layers.ReLU(name="stem_relu")(x)
    x = residual_stages(x, n, _STAGE_FILTERS, conv=tf.keras.layers.Conv2D,
                        regularizer=regularizer)
    x = tf.keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = tf.keras.layers.Dense(num_classes, kernel_initializer="he_normal",
                                    kernel_regularizer=regularizer, name="logits")(x)
    return tf.keras.Model(inputs, outputs, name=name or f"resnet{depth}")


def check_input_shape(input_shape) -> tuple[int, ...]:
    """``input_shape`` as a tuple of ints; ValueError unless it is non-empty and positive."""
    shape = tuple(int(d) for d in input_shape)
    if not shape or min(shape) <= 0:
        raise ValueError(f"`input_shape` must be a non-empty tuple of positive integers. "
                         f"Received: input_shape={shape}")
    return shape


def check_num_classes(num_classes: int) -> None:
    """Raise a ValueError unless ``num_classes`` is an integer ≥ 2."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(
            f"`num_classes` must be an integer >= 2. Received: num_classes={num_classes}")


def resnet20(input_shape: Sequence[int] = (32, 32, 3), num_classes: int = 10,
             weight_decay: float = 1e-4) -> tf.keras.Model:
    """ResNet-20 (n=3). See :func:`resnet`."""
    return resnet(20, input_shape, num_classes, weight_decay)


def resnet32(input_shape: Sequence[int] = (32, 32, 3), num_classes: int = 10,
             weight_decay: float = 1e-4) -> tf.keras.Model:
    """ResNet-32 (n=5). See :func:`resnet`."""
    return resnet(32, input_shape, num_classes, weight_decay)


def resnet56(input_shape: Sequence[int] = (32, 32, 3), num_classes: int = 10,
             weight_decay: float = 1e-4) -> tf.keras.Model:
    """ResNet-56 (n=9). See :func:`resnet`."""
    return resnet(56, input_shape, num_classes, weight_decay)


def resnet110(input_shape: Sequence[int] = (32, 32, 3), num_classes: int = 10,
              weight_decay: float = 1e-4) -> tf.keras.Model:
    """ResNet-110 (n=18). See :func:`resnet`."""
    return resnet(110, input_shape, num_classes, weight_decay)
