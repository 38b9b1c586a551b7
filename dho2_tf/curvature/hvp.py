"""Hessian-vector products of a Keras model's loss on a fixed batch.

Two exact formulations of the same product H·v, traced once per (model, batch) so that Lanczos
can call it m times without retracing (Pearlmutter, "Fast exact multiplication by the Hessian",
Neural Computation 1994):

* ``"forward-over-reverse"`` (the default, as FOSI specifies it): the JVP of the gradient, a
  ``tf.autodiff.ForwardAccumulator`` around the ``tf.GradientTape`` of the gradient;
* ``"reverse-over-reverse"``: ∇_θ ⟨∇_θ L(θ), v⟩, a gradient of the gradient (two nested
  ``tf.GradientTape``).

Both compute the same exact product. Forward-over-reverse carries tangents through the backward
pass instead of keeping that pass's intermediates for a second backward pass, so it can need
less memory when activations dominate; its graph takes longer to build (the accumulator traces
one JVP function per kind of operation of the backward pass, paid once per process at ``bind``,
see ``benchmarks/bench_curvature_cost.py`` for both costs). Models whose weights are read by
index (``Embedding``) fall back to reverse-over-reverse (see :func:`make_hvp_fn`).

Layers that update state in the forward pass (batch normalisation's moving mean and variance)
leave it unchanged: by default the traced product assigns the saved values back after the
forward pass; with ``skip_layer_updates=True`` the updates are never made (Keras' ``add_update``
is off while the product is traced), so the product assigns no variable at all, which
``tf.vectorized_map`` needs (:func:`dho2_tf.curvature.block_ops.block_hvp`).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator, Sequence

import tensorflow as tf

from dho2_tf.flat import FlatSpec, flatten, unflatten

logger = logging.getLogger(__name__)

LossFn = Callable[[Any, Any], tf.Tensor]
HvpFn = Callable[[tf.Tensor], tf.Tensor]

#: The formulations of H·v :func:`make_hvp_fn` offers, its default first.
HVP_METHODS = ("forward-over-reverse", "reverse-over-reverse")

#: Op types that write a resource variable (what :func:`layers_assigning_variables` looks for).
ASSIGN_OPS = frozenset({"AssignVariableOp", "AssignAddVariableOp", "AssignSubVariableOp"})


def check_hvp_method(method: str) -> str:
    """``method`` if it is one of :data:`HVP_METHODS`, else ValueError."""
    if method not in HVP_METHODS:
        raise ValueError(f"`hvp_method` must be one of {HVP_METHODS}. "
                         f"Received: hvp_method={method!r}")
    return method


def _resolve_variables(model: tf.keras.Model,
                       variables: Sequence[tf.Variable] | None) -> list[tf.Variable]:
    variables = list(model.trainable_variables if variables is None else variables)
    if not variables:
        raise ValueError(
            "`variables` must be a non-empty list of variables (the model has no trainable "
            "variables, or an empty list was passed). Build the model before asking for HVPs.")
    return variables


def _frozen_state(model: tf.keras.Model, variables: Sequence[tf.Variable]) -> list[tf.Variable]:
    """Non-trainable variables of ``model`` (e.g. BN moving statistics) not among ``variables``."""
    differentiated = {v.ref() for v in variables}
    return [v for v in model.non_trainable_variables if v.ref() not in differentiated]


def _batch_loss(model: tf.keras.Model, loss_fn: LossFn, x: Any, y: Any,
                training: bool) -> tf.Tensor:
    """loss_fn(y, model(x)) + Σ model.losses (regularisers are part of the curvature)."""
    loss = loss_fn(y, model(x, training=training))
    if model.losses:
        loss = loss + tf.add_n([tf.cast(r, loss.dtype) for r in model.losses])
    return loss


def _keras_layers(model: tf.keras.Model) -> list[tf.keras.layers.Layer]:
    """``model`` and every Keras layer inside it, each once."""
    layers = {id(model): model}
    for module in model.submodules:
        if isinstance(module, tf.keras.layers.Layer):
            layers.setdefault(id(module), module)
    return list(layers.values())


def _skip_update(updates: Any) -> None:
    """A layer's ``add_update`` that runs nothing."""
    del updates


@contextlib.contextmanager
def _layer_updates_skipped(model: tf.keras.Model) -> Iterator[None]:
    """While active (at trace time), every layer's ``add_update`` runs nothing: a batch-norm
    layer in training mode still normalises with the batch statistics but does not assign its
    moving mean and variance (Keras runs those assignments only through ``add_update``)."""
    layers = _keras_layers(model)
    for layer in layers:
        object.__setattr__(layer, "add_update", _skip_update)
    try:
        yield
    finally:
        for layer in layers:
            object.__delattr__(layer, "add_update")


def layers_assigning_variables(hvp: Callable[[tf.Tensor], tf.Tensor],
                               model: tf.keras.Model) -> list[str]:
    """Names of the layers of ``model`` whose variables the traced ``hvp`` (a ``tf.function``
    of :func:`make_hvp_fn`) assigns, innermost layer per variable, sorted; an assignment to a
    variable outside the model is named by its op. Empty when the product writes no variable."""
    graph = hvp.get_concrete_function().graph
    outer_of = {id(internal): external for external, internal in graph.captures}
    by_handle = {id(v.handle): v for v in model.variables}
    layers = _keras_layers(model)
    names = set()
    for op in graph.get_operations():
        if op.type not in ASSIGN_OPS:
            continue
        var = by_handle.get(id(outer_of.get(id(op.inputs[0]))))
        owners = [] if var is None else [
            layer for layer in layers if any(w is var for w in layer.weights)]
        names.add(min(owners, key=lambda layer: len(layer.weights)).name if owners
                  else f"op {op.name}")
    return sorted(names)


def _as_tensors(batch: tuple[Any, Any]) -> tuple[Any, Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(f"`batch` must be a tuple (x, y). Received: {type(batch).__name__}")
    return tuple(tf.nest.map_structure(tf.convert_to_tensor, part) for part in batch)


def make_hvp_fn(model: tf.keras.Model, loss_fn: LossFn, batch: tuple[Any, Any], *,
                training: bool = True, hvp_dtype: tf.DType = tf.float32,
                variables: Sequence[tf.Variable] | None = None,
                method: str = HVP_METHODS[0], skip_layer_updates: bool = False) -> HvpFn:
    """Build ``hvp(v_flat) = H·v`` for the loss of ``model`` on a fixed ``batch``.

    Math:
        θ ∈ ℝⁿ are ``variables`` flattened in order (default ``model.trainable_variables``;
        ``dho2_tf.flat``), (x, y) = ``batch``, f is ``loss_fn``:

            L(θ) = f(y, model_θ(x, training)) + Σ model.losses
            hvp(v) = ∇²L(θ) · v = ∂/∂ε ∇L(θ + ε v) |_{ε=0}

        computed forward-over-reverse (``method`` default): a ``tf.autodiff.ForwardAccumulator``
        with tangents ``unflatten(v)`` around the ``tf.GradientTape`` of the gradient, or
        reverse-over-reverse, hvp(v) = ∇_θ ⟨∇_θ L(θ), v⟩ (Pearlmutter 1994). Models with an
        ``Embedding`` (a gather of a variable, which TensorFlow cannot forward-differentiate in a
        traced function) always take the reverse-over-reverse product. The result is exact up
        to rounding, never a finite difference.

    The returned callable is a ``tf.function`` with a fixed input signature
    ``TensorSpec([n], hvp_dtype)``, traced once; the batch is captured as tensors. Every call
    leaves the model's non-trainable variables (BatchNorm moving mean/variance, counters)
    unchanged: they are read before the forward pass and assigned back after it, inside the same
    traced function; or, with ``skip_layer_updates``, the layers' updates (``add_update``: the
    BatchNorm moving averages) are skipped while the product is traced, so it assigns nothing.
    Both leave the product unchanged: in training mode batch norm normalises with the batch
    statistics, which the moving averages do not enter. The trainable variables are read at
    call time, so the HVP follows training.

    Args:
        model: a built Keras model.
        loss_fn: ``loss_fn(y_true, y_pred) -> scalar`` (mean over the batch), e.g. a
            ``tf.keras.losses.Loss`` instance.
        batch: ``(x, y)``; nested structures are allowed. Kept as tensors for every call.
        training: passed to ``model(x, training=...)``. Defaults to ``True`` (BN uses batch
            statistics, as in the released code). Dropout must be off or deterministic, otherwise
            successive HVPs see different operators.
        hvp_dtype: dtype of ``v_flat`` and of the result. Defaults to ``tf.float32``.
        variables: the variables θ is made of, in flat order. Defaults to
            ``model.trainable_variables``.
        method: ``"forward-over-reverse"`` (default) or ``"reverse-over-reverse"`` (see the module
            docstring for when to choose which).
        skip_layer_updates: skip the layers' ``add_update`` state updates instead of restoring
            the state after them (the product then assigns no variable, as
            ``tf.vectorized_map`` needs, unless a layer assigns a variable directly in its
            ``call``: see :func:`layers_assigning_variables`). Defaults to ``False``.

    Returns:
        ``hvp(v_flat: hvp_dtype [n]) -> hvp_dtype [n]``.

    Raises:
        ValueError: for an unknown ``method``, a ``batch`` that is not ``(x, y)`` or no
            variables.

    Note:
        ``hvp_dtype=tf.float64`` only adds precision when the model's variables (and hence its
        computation) are float64; for a float32 model the tangents are cast to float32 and the
        float32 result is merely up-cast.
    """
    check_hvp_method(method)
    variables = _resolve_variables(model, variables)
    spec = FlatSpec.of(variables)
    x, y = _as_tensors(batch)
    frozen = _frozen_state(model, variables)
    var_dtypes = [v.dtype for v in variables]

    def restoring(product: Callable[[list[tf.Tensor]], list[tf.Tensor]]) -> HvpFn:
        """The traced HVP around ``product`` (tangents -> H·v per variable), restoring the
        frozen state after the forward pass (or skipping the layers' updates)."""

        @tf.function(input_signature=[tf.TensorSpec([spec.n], hvp_dtype)])
        def hvp(v_flat: tf.Tensor) -> tf.Tensor:
            tangents = [tf.cast(t, d) for t, d in zip(unflatten(v_flat, spec), var_dtypes)]
            if skip_layer_updates:
                with _layer_updates_skipped(model):
                    return flatten(product(tangents), spec, dtype=hvp_dtype)
            saved = [v.read_value() for v in frozen]
            result = flatten(product(tangents), spec, dtype=hvp_dtype)
            with tf.control_dependencies([result]):
                for var, value in zip(frozen, saved):
                    var.assign(value)
            return result

        return hvp

    def forward_over_reverse(tangents: list[tf.Tensor]) -> list[tf.Tensor]:
        with tf.autodiff.ForwardAccumulator(primals=variables, tangents=tangents) as acc:
            with tf.GradientTape() as tape:
                loss = _batch_loss(model, loss_fn, x, y, training)
            grads = tape.gradient(loss, variables,
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return acc.jvp(grads, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    def reverse_over_reverse(tangents: list[tf.Tensor]) -> list[tf.Tensor]:
        return _double_backward(model, loss_fn, x, y, training, variables, tangents)

    hvp = restoring(reverse_over_reverse if method == "reverse-over-reverse"
                    else forward_over_reverse)
    if method == "forward-over-reverse" and _has_gather_lookups(model):
        # TensorFlow cannot forward-differentiate a resource gather inside a traced function
        # ("Duplicate node name in graph: '.../embedding_lookup'"): trace now, and take the
        # reverse-over-reverse product (the same H·v, Pearlmutter 1994) when that happens.
        try:
            hvp.get_concrete_function()
        except ValueError as err:
            if "Duplicate node name" not in str(err):
                raise
            hvp = restoring(reverse_over_reverse)
            method = "reverse-over-reverse"
    logger.debug("HVP function built (%s): n=%d, %d variables, %d frozen (%s), training=%s, "
                 "dtype=%s", method, spec.n, len(variables), len(frozen),
                 "updates skipped" if skip_layer_updates else "restored", training,
                 hvp_dtype.name)
    return hvp


def _has_gather_lookups(model: tf.keras.Model) -> bool:
    """Whether ``model`` holds a layer that reads its weights by index (``Embedding``)."""
    return any(isinstance(layer, tf.keras.layers.Embedding) for layer in model.submodules)


def _double_backward(model: tf.keras.Model, loss_fn: LossFn, x: Any, y: Any, training: bool,
                     variables: Sequence[tf.Variable], v_parts: Sequence[tf.Tensor]
                     ) -> list[tf.Tensor]:
    """H·v per variable as ∇_θ ⟨∇_θ L(θ), v⟩ (nested tapes; sparse gradients made dense)."""
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            loss = _batch_loss(model, loss_fn, x, y, training)
        grads = inner.gradient(loss, variables,
                               unconnected_gradients=tf.UnconnectedGradients.ZERO)
        inner_product = tf.add_n([tf.reduce_sum(tf.convert_to_tensor(g) * v)
                                  for g, v in zip(grads, v_parts)])
    hv = outer.gradient(inner_product, variables,
                        unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return [tf.convert_to_tensor(h) for h in hv]


def hvp_double_backward(model: tf.keras.Model, loss_fn: LossFn, batch: tuple[Any, Any],
                        v_flat: tf.Tensor, training: bool = True,
                        variables: Sequence[tf.Variable] | None = None) -> tf.Tensor:
    """Reference H·v by reverse-over-reverse (nested tapes); test use only.

    Math:
        hvp(v) = ∇_θ ⟨∇_θ L(θ), v⟩ with L as in :func:`make_hvp_fn`.

    Runs eagerly and, like :func:`make_hvp_fn`, restores the model's non-trainable variables.

    Args:
        model: a built Keras model.
        loss_fn: ``loss_fn(y_true, y_pred) -> scalar``.
        batch: ``(x, y)``.
        v_flat: float [n], in the flat order of ``variables``.
        training: passed to the model call. Defaults to ``True``.
        variables: flat order; defaults to ``model.trainable_variables``.

    Returns:
        H·v as a flat [n] tensor of ``v_flat``'s dtype.
    """
    variables = _resolve_variables(model, variables)
    spec = FlatSpec.of(variables)
    x, y = _as_tensors(batch)
    v_flat = tf.convert_to_tensor(v_flat)
    frozen = _frozen_state(model, variables)
    saved = [tf.identity(v) for v in frozen]
    v_parts = [tf.cast(t, var.dtype) for t, var in zip(unflatten(v_flat, spec), variables)]
    hv = _double_backward(model, loss_fn, x, y, training, variables, v_parts)
    for var, value in zip(frozen, saved):
        var.assign(value)
    return flatten(hv, spec, dtype=v_flat.dtype)
