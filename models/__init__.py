"""Model zoo for the dho2_tf experiments: MLP, logistic regression, a dense autoencoder, CIFAR
ResNet-(6n+2) and a 1-D ResNet.

Every model is an uncompiled ``tf.keras`` model with logits output; build one by name with
``models.get(name, input_shape, num_classes, **kwargs)`` and compile it with the loss and
metrics of ``models.objective(name)``.
"""

from __future__ import annotations

from models.autoencoder import autoencoder
from models.logistic_regression import logistic_regression
from models.mlp import mlp
from models.objectives import CLASSIFICATION, RECONSTRUCTION, Objective
from models.registry import available, get, objective, register
from models.resnet import ZeroPadShortcut, resnet, resnet20, resnet32, resnet56, resnet110
from models.resnet1d import resnet1d

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
