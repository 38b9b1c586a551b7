"""dho2_tf: distributed hybrid-order optimization (DHO2/FOSI) for Keras + Horovod."""

from __future__ import annotations

__version__ = "0.1.0"
