"""Shared pytest set-up: quiet TensorFlow, deterministic single-threaded ops."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="module")
def mnist1d_once():
    """For one test module: ``load_mnist1d`` generates each dataset once (the same arguments
    give identical arrays; later calls return the first call's, read-only), for modules that
    call ``train`` many times (tests/helpers/mnist1d_once.py)."""
    import dho2_tf.training.data as data_module
    from tests.helpers.mnist1d_once import once

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data_module, "load_mnist1d", once(data_module.load_mnist1d))
        yield
