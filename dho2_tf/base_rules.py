"""Base (first-order) optimizers on flat vectors, and their Newton-momentum functions.

FOSI splits every step into a Newton part in span(V) and a base-optimizer part in the rest
(see :class:`dho2_tf.DHO2`). The base optimizer runs element-wise on this rank's shard of the flat
parameter vector, so it is implemented here rather than borrowed from Keras (Keras' Adam puts ε
inside a different expression; algorithm reference §4.3). Each rule returns the *signed
displacement* u (e.g. u = −lr·g for SGD) and its new slots.

Rules (t is the 1-based step count, β the rule's momentum):

* ``sgd``:      u = −lr·g
* ``momentum``: b ← g + β·b;  u = −lr·b                              (heavy ball, optax ``trace``)
* ``nesterov``: b ← g + β·b;  u = −lr·(g + β·b)
* ``adam``:     m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;
                u = −lr·m̂/(√v̂ + ε),  m̂ = m/(1−β₁ᵗ),  v̂ = v/(1−β₂ᵗ)

Newton-momentum function M(g₁, m) = A_g·g₁ + A_m·m (reference §3.3):
sgd (1, 0); momentum (1, β); nesterov (1+β, β²); adam (1−β₁, β₁) (EMA, no bias correction).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import tensorflow as tf

BASE_OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam")


@dataclasses.dataclass(frozen=True)
class BaseRule:
    """A base optimizer's hyper-parameters.

    Attributes:
        name: one of ``BASE_OPTIMIZERS``.
        momentum: β of ``momentum``/``nesterov`` (ignored otherwise).
        beta_1: β₁ of ``adam``.
        beta_2: β₂ of ``adam``.
        epsilon: ε of ``adam`` (added outside the square root).
    """

    name: str
    momentum: float = 0.9
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-8

    def __post_init__(self) -> None:
        if self.name not in BASE_OPTIMIZERS:
            raise ValueError(
                f"`base` must be one of {BASE_OPTIMIZERS}. Received: base={self.name!r}")
        for key in ("momentum", "beta_1", "beta_2"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"`{key}` must be in the range [0, 1). Received: {key}={value}")
        if self.epsilon < 0:
            raise ValueError(f"`epsilon` must be non-negative. Received: epsilon={self.epsilon}")

    @property
    def slot_names(self) -> tuple[str, ...]:
        """Names of the per-element state vectors this rule keeps."""
        return {"sgd": (), "momentum": ("momentum",), "nesterov": ("momentum",),
                "adam": ("m", "v")}[self.name]

    @property
    def newton_coefficients(self) -> tuple[float, float]:
        """(A_g, A_m) of the Newton-momentum function M(g₁, m) = A_g·g₁ + A_m·m."""
        beta = self.momentum
        return {"sgd": (1.0, 0.0), "momentum": (1.0, beta),
                "nesterov": (1.0 + beta, beta * beta),
                "adam": (1.0 - self.beta_1, self.beta_1)}[self.name]

    @property
    def default_c_max(self) -> float:
        """FOSI's default learning-rate clip: 1 for Adam (forced), 3 otherwise."""
        return 1.0 if self.name == "adam" else 3.0

    def displacement(self, g: tf.Tensor, slots: Sequence[tf.Tensor], lr: tf.Tensor,
                     step: tf.Tensor) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """Signed displacement u and new slots for gradient ``g``. See the module docstring.

        Args:
            g: float [s], the gradient component this rule acts on.
            slots: current slot values, in ``slot_names`` order, each float [s].
            lr: scalar learning rate (same dtype as ``g``).
            step: scalar, 1-based step count t (used by Adam's bias correction).

        Returns:
            ``(u, new_slots)``.
        """
        dtype = g.dtype
        if self.name == "sgd":
            return -lr * g, []
        if self.name in ("momentum", "nesterov"):
            beta = tf.cast(self.momentum, dtype)
            buf = g + beta * slots[0]
            direction = buf if self.name == "momentum" else g + beta * buf
            return -lr * direction, [buf]
        b1, b2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        t = tf.cast(step, dtype)
        m = b1 * slots[0] + (1.0 - b1) * g
        v = b2 * slots[1] + (1.0 - b2) * tf.square(g)
        m_hat = m / (1.0 - tf.pow(b1, t))
        v_hat = v / (1.0 - tf.pow(b2, t))
        return -lr * m_hat / (tf.sqrt(v_hat) + tf.cast(self.epsilon, dtype)), [m, v]
