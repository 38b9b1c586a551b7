"""Per-example losses and gradients, vectorised (no Python loop over examples).

Three scorers share one interface (docs/algorithm.md §9.7): called on a chunk
``(x, y)`` with the running full-gradient estimate ḡ and a validity mask, each returns
:class:`Scores` — ‖g_i‖², ⟨g_i, ḡ⟩, ℓ_i and Σ_i mask_i·g_i — in its own parameter space
(``scorer.variables``). See :class:`dho2_tf.prioritized.PrioritizedSampler` for the maths.

* :class:`ExactScorer` — full per-example gradients with ``tf.vectorized_map`` over a
  single-example ``GradientTape``. Memory ≈ chunk × n_params floats.
* :class:`LastLayerScorer` — the exact gradient with respect to the final ``Dense`` layer only, in
  closed form: with layer input a_i and δ_i = ∂ℓ_i/∂z_i at the pre-activation
  z_i = a_iᵀK + b, g_i^K = a_i δ_iᵀ and g_i^b = δ_i, so ‖g_i‖² = ‖δ_i‖²(‖a_i‖² + 1) and
  ⟨g_i, ḡ⟩ = a_iᵀ Ḡ_K δ_i + δ_iᵀ ḡ_b. One batched forward/backward; scales to large models.
* :class:`LossScorer` — ℓ_i only (forward pass); its parameter space is empty.

Scoring always runs the model with ``training=False`` (batch normalisation would couple examples).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import tensorflow as tf

LossFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]

SCORERS = ("exact", "last_layer", "auto")


class Scores(NamedTuple):
    """Per-example scores of one chunk.

    Attributes:
        length: float32 [B], ‖g_i‖².
        projection: float32 [B], ⟨g_i, ḡ⟩.
        loss: float32 [B], ℓ_i.
        grad_sum: Σ_i mask_i·g_i, one tensor per variable of the scorer's parameter space.
    """

    length: tf.Tensor
    projection: tf.Tensor
    loss: tf.Tensor
    grad_sum: list[tf.Tensor]


def per_example_loss_fn(loss: Any) -> LossFn:
    """A function ``(y_true, y_pred) -> float32 [B]`` of unreduced per-example losses.

    Args:
        loss: what ``model.compile(loss=...)`` accepts: a name, a ``tf.keras.losses.Loss``
            (cloned with ``reduction="none"``) or a function returning per-example losses.

    Returns:
        The per-example loss; extra trailing dimensions are averaged, as Keras does.

    Raises:
        ValueError: if ``loss`` is ``None``, a dict or a list (one output only).
    """
    if loss is None or isinstance(loss, (dict, list, tuple)):
        raise ValueError(
            "`loss` must be a single Keras loss (name, Loss instance or function) for a "
            f"single-output model. Received: loss={loss!r}")
    loss = tf.keras.losses.get(loss)
    if isinstance(loss, tf.keras.losses.Loss):
        loss = type(loss).from_config({**loss.get_config(), "reduction": "none"})

    def per_example(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        values = tf.cast(loss(y_true, y_pred), tf.float32)
        rank = values.shape.rank
        if rank is not None and rank > 1:
            values = tf.reduce_mean(values, axis=list(range(1, rank)))
        return values

    return per_example


def per_example_gradients(model: tf.keras.Model, loss_fn: LossFn, x: tf.Tensor, y: tf.Tensor,
                          variables: Sequence[tf.Variable] | None = None
                          ) -> tuple[list[tf.Tensor], tf.Tensor]:
    """Per-example gradients g_i = ∇ℓ_i, vectorised with ``tf.vectorized_map``.

    Args:
        model: a Keras model; called with ``training=False``.
        loss_fn: per-example loss ``(y_true, y_pred) -> [B]`` (see :func:`per_example_loss_fn`).
        x: inputs [B, ...].
        y: targets [B, ...].
        variables: differentiate with respect to these (default ``model.trainable_variables``).

    Returns:
        ``(grads, losses)``: one float32 tensor [B, *var.shape] per variable, and ℓ_i [B].
    """
    variables = list(model.trainable_variables if variables is None else variables)

    def one_example(xy: tuple[tf.Tensor, tf.Tensor]) -> tuple[list[tf.Tensor], tf.Tensor]:
        xi, yi = xy
        with tf.GradientTape() as tape:
            li = tf.reduce_sum(loss_fn(yi[None], model(xi[None], training=False)))
        grads = tape.gradient(li, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return grads, li

    return tf.vectorized_map(one_example, (x, y))


def _mask_or_ones(mask: tf.Tensor | None, x: tf.Tensor) -> tf.Tensor:
    return tf.ones(tf.shape(x)[:1], tf.float32) if mask is None else tf.cast(mask, tf.float32)


class ExactScorer:
    """Full per-example gradients (docs/prioritized.md). See ``PrioritizedSampler``.

    Args:
        model: the Keras model.
        loss_fn: per-example loss.
    """

    needs_gradients = True

    def __init__(self, model: tf.keras.Model, loss_fn: LossFn) -> None:
        self.model = model
        self.loss_fn = loss_fn

    @property
    def variables(self) -> list[tf.Variable]:
        """Parameter space of ḡ: all trainable variables."""
        return list(self.model.trainable_variables)

    def __call__(self, x: tf.Tensor, y: tf.Tensor, gbar: Sequence[tf.Tensor],
                 mask: tf.Tensor | None = None) -> Scores:
        """Scores of the chunk ``x`` [B, ...], ``y`` [B, ...]; ``mask`` float [B] for grad_sum."""
        grads, losses = per_example_gradients(self.model, self.loss_fn, x, y, self.variables)
        mask = _mask_or_ones(mask, x)
        length = tf.zeros_like(losses)
        projection = tf.zeros_like(losses)
        grad_sum = []
        for g, gb in zip(grads, gbar):
            g_flat = tf.reshape(g, [tf.shape(g)[0], -1])
            length += tf.reduce_sum(tf.square(g_flat), axis=1)
            projection += tf.linalg.matvec(g_flat, tf.reshape(gb, [-1]))
            grad_sum.append(tf.tensordot(mask, g, axes=1))
        return Scores(length, projection, losses, grad_sum)


class LastLayerScorer:
    """Exact gradients of the final ``Dense`` layer in closed form (docs/prioritized.md).

    The "last-layer shortcut" for large models: only the penultimate features a_i and the output
    error δ_i are materialised. See ``PrioritizedSampler`` for the priorities.

    Args:
        model: a Sequential or functional Keras model whose last layer is ``Dense``.
        loss_fn: per-example loss.

    Raises:
        ValueError: if the last layer is not ``Dense`` or its input cannot be reached.
    """

    needs_gradients = True

    def __init__(self, model: tf.keras.Model, loss_fn: LossFn) -> None:
        layer = model.layers[-1] if model.layers else None
        if not isinstance(layer, tf.keras.layers.Dense):
            raise ValueError(
                "`per_example='last_layer'` needs a model whose last layer is Dense. "
                f"Received: last layer {type(layer).__name__}")
        try:
            self._features = tf.keras.Model(model.inputs, layer.input)
        except (AttributeError, TypeError, ValueError) as err:
            raise ValueError(
                "`per_example='last_layer'` needs a Sequential or functional model (built, with "
                f"known inputs) so the last layer's input can be read. Received: {model!r}"
            ) from err
        self.layer = layer
        self.loss_fn = loss_fn

    @property
    def variables(self) -> list[tf.Variable]:
        """Parameter space of ḡ: the last layer's kernel (and bias)."""
        return [self.layer.kernel] + ([self.layer.bias] if self.layer.use_bias else [])

    def features(self, x: tf.Tensor, training: bool = False) -> tf.Tensor:
        """a_i, the last layer's input: float32 [B, d]."""
        return tf.cast(self._features(x, training=training), tf.float32)

    def pre_activation(self, a: tf.Tensor) -> tf.Tensor:
        """z_i = a_iᵀK + b: float32 [B, out] (differentiable in K, b and a)."""
        z = tf.matmul(a, self.layer.kernel)
        if self.layer.use_bias:
            z = z + self.layer.bias
        return z

    def __call__(self, x: tf.Tensor, y: tf.Tensor, gbar: Sequence[tf.Tensor],
                 mask: tf.Tensor | None = None) -> Scores:
        """Scores of the chunk ``x`` [B, ...], ``y`` [B, ...]; ``mask`` float [B] for grad_sum."""
        a = self.features(x)
        return self.scores_from(a, self.pre_activation(a), y, gbar, mask)

    def scores_from(self, a: tf.Tensor, z: tf.Tensor, y: tf.Tensor, gbar: Sequence[tf.Tensor],
                    mask: tf.Tensor | None = None) -> Scores:
        """Scores from the features a [B, d] and pre-activations z [B, out] of a forward pass.

        The training step calls this on its own forward pass (``refresh="free"``): only the
        loss head is re-evaluated, on ``stop_gradient(z)``, to get δ_i = ∂ℓ_i/∂z_i.
        """
        a, z = tf.stop_gradient(a), tf.stop_gradient(z)
        with tf.GradientTape() as tape:
            tape.watch(z)
            losses = self.loss_fn(y, self.layer.activation(z))
            total = tf.reduce_sum(losses)
        delta = tape.gradient(total, z)  # [B, out]; per-example because the loss is summed
        mask = _mask_or_ones(mask, a)
        a_sq = tf.reduce_sum(tf.square(a), axis=1)
        delta_sq = tf.reduce_sum(tf.square(delta), axis=1)
        bias_term = 1.0 if self.layer.use_bias else 0.0
        length = delta_sq * (a_sq + bias_term)
        projection = tf.reduce_sum(tf.matmul(a, gbar[0]) * delta, axis=1)
        grad_sum = [tf.matmul(a, delta * mask[:, None], transpose_a=True)]
        if self.layer.use_bias:
            projection += tf.linalg.matvec(delta, gbar[1])
            grad_sum.append(tf.reduce_sum(delta * mask[:, None], axis=0))
        return Scores(length, projection, losses, grad_sum)


class LossScorer:
    """Per-example losses only (docs/prioritized.md); length and projection are zero.

    Args:
        model: the Keras model.
        loss_fn: per-example loss.
    """

    needs_gradients = False
    variables: list[tf.Variable] = []

    def __init__(self, model: tf.keras.Model, loss_fn: LossFn) -> None:
        self.model = model
        self.loss_fn = loss_fn

    def __call__(self, x: tf.Tensor, y: tf.Tensor, gbar: Sequence[tf.Tensor],
                 mask: tf.Tensor | None = None) -> Scores:
        """Scores of the chunk ``x`` [B, ...], ``y`` [B, ...]."""
        losses = self.loss_fn(y, self.model(x, training=False))
        zeros = tf.zeros_like(losses)
        return Scores(zeros, zeros, losses, [])


def make_scorer(per_example: str, model: tf.keras.Model, loss_fn: LossFn,
                needs_gradients: bool) -> ExactScorer | LastLayerScorer | LossScorer:
    """The scorer for ``per_example`` (``"exact"``, ``"last_layer"`` or ``"auto"``).

    ``"auto"`` is ``"last_layer"`` when the model ends in a reachable ``Dense`` layer, else
    ``"exact"``. ``LossScorer`` is returned when no priority needs a gradient.
    """
    if not needs_gradients:
        return LossScorer(model, loss_fn)
    if per_example == "exact":
        return ExactScorer(model, loss_fn)
    if per_example == "last_layer":
        return LastLayerScorer(model, loss_fn)
    if per_example == "auto":
        try:
            return LastLayerScorer(model, loss_fn)
        except ValueError:
            return ExactScorer(model, loss_fn)
    raise ValueError(
        f"`per_example` must be one of {SCORERS}. Received: per_example={per_example!r}")
