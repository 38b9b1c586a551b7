"""The loss whose Hessian DHO2 estimates: a name, a callable, or the compiled model's loss."""

from __future__ import annotations

from typing import Any, Callable

import tensorflow as tf


def resolve_loss(model: tf.keras.Model, loss: Callable | str | None) -> Callable:
    """``loss(y_true, y_pred) -> scalar``, the function whose Hessian DHO2 estimates.

    With ``loss=None``, the loss the compiled model minimises (:class:`CompiledLoss`: per-output
    losses and loss weights, as ``model.fit`` does). Otherwise a Keras loss name, a
    ``tf.keras.losses.Loss`` (used as it is) or a callable; a name or callable that returns one
    value per sample is averaged over them, as Keras' ``SUM_OVER_BATCH_SIZE`` reduction does.
    (Regularisation terms ``model.losses`` are added by the HVP itself.)

    Raises:
        ValueError: for an uncompiled model without ``loss``, or a per-output structure of
            losses (compile the model with it and pass ``loss=None``).
    """
    if loss is None:
        if getattr(model, "compiled_loss", None) is None or not getattr(model, "loss", None):
            raise ValueError("No loss given and the model is not compiled: pass `loss=` "
                             "explicitly.")
        return CompiledLoss(model)
    if isinstance(loss, (dict, list, tuple)):
        raise ValueError("`loss` must be a single loss (a name, a tf.keras.losses.Loss or a "
                         "callable); for per-output losses compile the model with them and "
                         f"pass loss=None. Received: {loss!r}")
    fn = tf.keras.losses.get(loss) if isinstance(loss, str) else loss
    if isinstance(fn, tf.keras.losses.Loss):
        return fn
    if not callable(fn):
        raise ValueError(f"`loss` must be callable. Received: {loss!r}")
    return lambda y_true, y_pred: tf.reduce_mean(fn(y_true, y_pred))


class CompiledLoss:
    r"""The loss a compiled Keras model minimises, without its loss metrics.

    Math:
        For outputs i with a loss ℓ_i (``compile(loss=...)``, one loss is used for every output)
        and weight w_i (``loss_weights``, default 1)::

            L(y, ŷ) = Σ_i w_i · ℓ_i(y_i, ŷ_i)

        each ℓ_i reduced as Keras reduces it (mean over the samples for names and functions),
        with Keras' dtype/rank matching and output masks. ``model.losses`` is added by the HVP.

    A label structure with another number of entries than the model has outputs raises a
    ValueError naming both counts.
    """

    def __init__(self, model: tf.keras.Model) -> None:
        from keras.src.engine import compile_utils

        self._utils = compile_utils
        compiled = model.compiled_loss
        self.num_outputs = len(model.outputs) if getattr(model, "outputs", None) else None
        self.container = compile_utils.LossesContainer(
            compiled._user_losses, compiled._user_loss_weights, output_names=model.output_names)
        if getattr(model, "outputs", None):
            outputs = model.outputs
            self.container.build(outputs[0] if len(outputs) == 1 else list(outputs))

    def __call__(self, y_true: Any, y_pred: Any) -> tf.Tensor:
        from keras.src.utils import losses_utils

        c = self.container
        y_true = c._conform_to_outputs(y_pred, y_true)
        if not c.built:
            c.build(y_pred)
        trues, preds = tf.nest.flatten(y_true), tf.nest.flatten(y_pred)
        if len(trues) != len(preds):
            raise ValueError(f"The curvature labels have {len(trues)} part(s) but the model has "
                             f"{len(preds)} output(s): pass one label array per output, e.g. "
                             "batch=(x, (y_1, y_2)).")
        values = []
        for y_t, y_p, loss_obj, weight in zip(trues, preds, c._losses, c._loss_weights):
            if y_t is None or loss_obj is None:
                continue
            y_t, y_p, sw = self._utils.match_dtype_and_rank(y_t, y_p, None)
            sw = losses_utils.apply_mask(y_p, sw, losses_utils.get_mask(y_p))
            value = loss_obj(y_t, y_p, sample_weight=sw)
            values.append(value if weight is None else value * weight)
        if not values:
            raise ValueError("The compiled model has no loss for any output.")
        return tf.add_n(losses_utils.cast_losses_to_common_dtype(values))
