"""Generate each MNIST-1D dataset once per process where tests load it many times.

Checks that run the README code or ``jobs/train.py``'s ``main`` several times in one process,
and test modules that call ``train`` again and again, ask ``load_mnist1d`` for the same
arguments each time, and the same arguments give identical arrays. With the generator
replaced by :func:`once`, every call after the first returns the first call's dataset, its
arrays read-only (so no run can change another's data unnoticed). ``load_dataset`` and the
training job reach the generator through the module attribute, so they see the replacement.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import dho2_tf.training.data as data_module

#: (args, sorted kwargs) -> the dataset, for every replacement in this process.
_MADE: dict[tuple, Any] = {}


def once(generate: Callable[..., Any]) -> Callable[..., Any]:
    """``generate`` (``load_mnist1d``) called at most once per distinct set of arguments."""

    @functools.wraps(generate)
    def load_mnist1d(*args, **kwargs):
        key = (args, tuple(sorted(kwargs.items())))
        if key not in _MADE:
            made = generate(*args, **kwargs)
            for array in (made.x_train, made.y_train, made.x_test, made.y_test):
                array.setflags(write=False)
            _MADE[key] = made
        return _MADE[key]

    return load_mnist1d


def generate_mnist1d_once() -> None:
    """Replace ``dho2_tf.training.data.load_mnist1d`` by :func:`once` of it for the rest of
    this process (scripts run under horovodrun)."""
    data_module.load_mnist1d = once(data_module.load_mnist1d)
