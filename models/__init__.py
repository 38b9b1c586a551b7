"""Model zoo for the dho2_tf experiments: MLP, CIFAR ResNet-(6n+2) and a 1-D ResNet.

Every model is an uncompiled ``tf.keras`` model with logits output; build one by name with
``models.get(name, input_shape, num_classes, **kwargs)``.
"""

from __future__ import annotations

from models.mlp import mlp
from models.registry import available, get, register
from models.resnet import ZeroPadShortcut, resnet, resnet20, resnet32, resnet56, resnet110
from models.resnet1d import resnet1d

__all__ = [
    "ZeroPadShortcut",
    "available",
    "get",
    "mlp",
    "register",
    "resnet",
    "resnet1d",
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet110",
]
