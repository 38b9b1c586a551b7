"""Base (first-order) optimizers on flat vectors, and their Newton-momentum functions.

FOSI splits every step into a Newton part in span(V) and a base-optimizer part in the rest
(see :class:`dho2_tf.DHO2`). The base optimizer runs element-wise on this rank's shard of the flat
parameter vector, so it is implemented here rather than borrowed from Keras (Keras' Adam adds ε
to √v, FOSI's Adam adds it to √v̂, as below). Each rule returns the *signed displacement* u
(e.g. u = −lr·g for SGD) and its new slots; u is linear in lr, so a caller scaling the step by c
passes lr·c.

Rules (t is the 1-based step count, β the rule's momentum):

* ``sgd``:      u = −lr·g
* ``momentum``: b ← g + β·b;  u = −lr·b                              (heavy ball, optax ``trace``)
* ``nesterov``: b ← g + β·b;  u = −lr·(g + β·b)
* ``adam``:     m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;
                u = −lr·m̂/(√v̂ + ε),  m̂ = m/(1−β₁ᵗ),  v̂ = v/(1−β₂ᵗ)

Newton-momentum function M(g₁, m) = A_g·g₁ + A_m·m (Sivan et al., ICLR 2024, §3):
sgd (1, 0); momentum (1, β); nesterov (1+β, β²); adam (1−β₁, β₁) (EMA, no bias correction).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import tensorflow as tf

from dho2_tf.numerics import scalar

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
    def linear(self) -> bool:
        """Whether u is linear in the gradient and the slots (every rule but Adam)."""
        return self.name != "adam"

    @property
    def linear_buffer(self) -> bool:
        """Whether the rule keeps a heavy-ball buffer b (``momentum``, ``nesterov``)."""
        return self.name in ("momentum", "nesterov")

    @property
    def updates_in_place(self) -> bool:
        """Whether the rule has a fused in-place step: :meth:`apply_linear_in_place` for
        sgd/momentum/nesterov, :meth:`apply_in_place` for Adam with ε > 0.

        (With ε = 0 a zero v gives u = 0/0, a non-finite base step that must leave the slots
        untouched, so that case keeps the out-of-place :meth:`displacement`.)
        """
        return self.linear or self.epsilon > 0

    def apply_linear_in_place(self, out: tf.Variable, slots: Sequence[tf.Variable],
                              g: tf.Tensor, lr: tf.Tensor, init: tf.Tensor) -> tf.Tensor:
        """out ← init + u for a linear rule, in one fused pass (the buffer updated in place).

        Math: out ← init, then TF's ``ResourceApplyGradientDescent`` (sgd: out ← out − lr·g)
        or ``ResourceApplyMomentum`` (b ← β·b + g; momentum: out ← out − lr·b; nesterov:
        out ← out − lr·g − lr·β·b), i.e. out = init + u with u of :meth:`displacement`.

        Args:
            out: float [s] variable receiving init + u.
            slots: the heavy-ball buffer b (``momentum``/``nesterov``), float [s]; else empty.
            g: float [s] gradient.
            lr: scalar learning rate (same dtype as ``g``).
            init: float [s], what u is added to.

        Returns:
            init + u, read from ``out``.
        """
        if not self.linear:
            raise ValueError(f"Base {self.name!r} is not linear; use apply_in_place.")
        out.assign(init)
        if self.name == "sgd":
            tf.raw_ops.ResourceApplyGradientDescent(var=out.handle, alpha=lr, delta=g)
        else:
            tf.raw_ops.ResourceApplyMomentum(
                var=out.handle, accum=slots[0].handle, lr=lr, grad=g,
                momentum=scalar(self.momentum, g.dtype),
                use_nesterov=self.name == "nesterov")
        return out.read_value()

    def apply_in_place(self, out: tf.Variable, slots: Sequence[tf.Variable], g: tf.Tensor,
                       lr: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
        """:meth:`displacement` of Adam in one fused pass: the slots are updated in place.

        Math: out ← 0, then TF's ``ResourceApplyAdam`` kernel with β₁ᵗ, β₂ᵗ and ε·√(1−β₂ᵗ):
        m ← m + (1−β₁)(g − m), v ← v + (1−β₂)(g² − v),
        out ← out − lr·√(1−β₂ᵗ)/(1−β₁ᵗ)·m/(√v + ε·√(1−β₂ᵗ)) = −lr·m̂/(√v̂ + ε) = u.

        Args:
            out: float [s] variable receiving u.
            slots: the ``m`` and ``v`` variables, each float [s].
            g: float [s] gradient.
            lr: scalar learning rate (same dtype as ``g``).
            step: scalar, 1-based step count t.

        Returns:
            u, read from ``out`` after the update.
        """
        if self.linear or not self.updates_in_place:
            raise ValueError(f"Base {self.name!r} (epsilon={self.epsilon}) has no in-place "
                             "Adam step.")
        dtype = g.dtype
        b1, b2 = scalar(self.beta_1, dtype), scalar(self.beta_2, dtype)
        t = tf.cast(step, dtype)
        b1_power, b2_power = tf.pow(b1, t), tf.pow(b2, t)
        out.assign(tf.zeros_like(g))
        tf.raw_ops.ResourceApplyAdam(
            var=out.handle, m=slots[0].handle, v=slots[1].handle, beta1_power=b1_power,
            beta2_power=b2_power, lr=lr, beta1=b1, beta2=b2,
            epsilon=scalar(self.epsilon, dtype) * tf.sqrt(1.0 - b2_power), grad=g)
        return out.read_value()

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
            beta = scalar(self.momentum, dtype)
            buf = g + beta * slots[0]
            if self.name == "momentum":
                return -lr * buf, [buf]
            return -lr * (g + beta * buf), [buf]
        # m̂/(√v̂ + ε) = [√(1−β₂ᵗ)/(1−β₁ᵗ)]·m/(√v + ε·√(1−β₂ᵗ)): the bias corrections become
        # two scalars, leaving four element-wise operations for u.
        b1, b2 = scalar(self.beta_1, dtype), scalar(self.beta_2, dtype)
        t = tf.cast(step, dtype)
        root_c2 = tf.sqrt(1.0 - tf.pow(b2, t))
        m = b1 * slots[0] + (1.0 - b1) * g
        v = b2 * slots[1] + (1.0 - b2) * tf.square(g)
        step_size = -lr * root_c2 / (1.0 - tf.pow(b1, t))
        return step_size * m / (tf.sqrt(v) + scalar(self.epsilon, dtype) * root_c2), [m, v]
