"""Model zoo for the dho2_tf experiments: MLP, logistic regression, a dense autoencoder, CIFAR
ResNet-(6n+2) and a 1-D ResNet.

Every model is an uncompiled ``tf.keras`` model with logits output; build one by name with
``models.get(name, input_shape, num_classes, **kwargs)`` and compile it with the loss and
metrics of ``models.objective(name)``.
"""

from __future__ import annotations

from dho2_tf.models.autoencoder import autoencoder
from dho2_tf.models.logistic_regression import logistic_regression
from dho2_tf.models.mlp import mlp
from dho2_tf.models.objectives import CLASSIFICATION, RECONSTRUCTION, Objective
from dho2_tf.models.registry import available, get, objective, register
from dho2_tf.models.resnet import ZeroPadShortcut, resnet, resnet20, resnet32, resnet56, resnet110
from dho2_tf.models.resnet1d import resnet1d

__all__ = [
    "CLASSIFICATION",
    "Objective",
    "RECONSTRUCTION",
    "ZeroPadShortcut",
    "autoencoder",
    "available",
    "get",
    "logistic_regression",
    "mlp",
    "objective",
    "register",
    "resnet",
    "resnet1d",
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet110",
]
