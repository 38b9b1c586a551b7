"""Curvature: Hessian-vector products, compiled Lanczos and extreme eigenpairs (ESE).

Pure functions of tensors plus a communicator argument; nothing here imports Horovod.
"""

from __future__ import annotations

from dho2_tf.curvature.hvp import hvp_double_backward, make_hvp_fn
from dho2_tf.curvature.lanczos import LanczosProgram, LanczosResult, lanczos
from dho2_tf.curvature.spectrum import (EigenEstimate, SpectrumEstimator, estimate_spectrum,
                                        extreme_eigenpairs, gather_vectors)

__all__ = [
    "EigenEstimate",
    "SpectrumEstimator",
    "LanczosProgram",
    "LanczosResult",
    "estimate_spectrum",
    "extreme_eigenpairs",
    "gather_vectors",
    "hvp_double_backward",
    "lanczos",
    "make_hvp_fn",
]
