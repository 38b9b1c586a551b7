"""Shared pytest set-up: quiet TensorFlow, deterministic single-threaded ops."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
