"""Keras integration: a model wrapper whose ``fit`` trains with prioritized SGD."""

from __future__ import annotations

import logging
import math
from typing import Any

import tensorflow as tf

from dho2_tf.distributed.comm import Communicator, default_comm
from dho2_tf.prioritized.per_example import LastLayerScorer
from dho2_tf.prioritized.sampler import PrioritizedSampler

logger = logging.getLogger(__name__)


@tf.keras.utils.register_keras_serializable(package="dho2_tf")
class PrioritizedModel(tf.keras.Model):
    """Wrap a Keras model so that ``fit(x, y)`` trains it with prioritized SGD.

    ``compile`` and ``fit`` are the usual Keras calls and any optimizer works (plain SGD, Adam,
    ``dho2_tf.DHO2``, ...). ``fit(x, y)`` takes this rank's shard, runs the initial priority pass
    (once), then each step refreshes R_j priorities, selects the step's examples and applies one
    optimizer update. ``evaluate``, ``predict`` and ``validation_data`` behave as for the wrapped
    model. Under ``horovodrun`` the wrapper broadcasts the weights of rank 0 before the initial
    pass and averages gradients over ranks with the communicator.

    Math:
        Step t on rank j (see :class:`PrioritizedSampler` for the priorities, the estimator and
        the selection rules): Ref = next R_j examples; refresh p(Ref) and ḡ; (S, w) = select(p̂(t));
        G_j = ∇_w [Σ_{i∈S} w_i ℓ_i (+ (1/R_j) Σ_{i∈Ref} ℓ_i)]; G = (1/P) Σ_j G_j;
        w ← optimizer(w, G); t ← t + 1. With ``refresh="free"`` Ref is empty and p(S) is
        stored from the step's own forward pass at the weights of step t (last Dense layer in
        closed form), before the update.

    Args:
        model: the Keras model to train (single output).
        sampler: the :class:`PrioritizedSampler` (default: ``PrioritizedSampler()``, the
            recommended configuration: uniform sampling until importance sampling pays for
            its measured cost, priorities refreshed for free every N-th step while uniform;
            ``PrioritizedSampler.paper()`` is the paper's released configuration).
        average_gradients: allreduce-average the gradients over ranks before
            ``apply_gradients``. ``None`` (default) averages unless the optimizer has its own
            ``comm`` communicator (as ``dho2_tf.DHO2``, which averages gradients itself).
        comm: communicator (default :func:`dho2_tf.distributed.comm.default_comm`).
        **kwargs: ``tf.keras.Model`` arguments (e.g. ``name``).

    Example:
        >>> pmodel = PrioritizedModel(model, PrioritizedSampler(k=0.05))
        >>> pmodel.compile(optimizer="sgd", loss=loss, metrics=["accuracy"])
        >>> pmodel.fit(x_shard, y_shard, epochs=5, validation_data=(x_test, y_test))
    """

    def __init__(self, model: tf.keras.Model, sampler: PrioritizedSampler | None = None, *,
                 average_gradients: bool | None = None, comm: Communicator | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(model, tf.keras.Model):
            raise ValueError(f"`model` must be a tf.keras.Model. Received: model={model!r}")
        if sampler is not None and not isinstance(sampler, PrioritizedSampler):
            raise ValueError(f"`sampler` must be a PrioritizedSampler or None. "
                             f"Received: sampler={sampler!r}")
        self.model = model
        # The table is per rank: keep it out of `variables` so that no weight broadcast
        # (Horovod's callback, DHO2's initial broadcast) copies rank 0's table, but keep it in
        # checkpoints (`save_weights`, `tf.train.Checkpoint`).
        object.__setattr__(self, "_sampler", sampler or PrioritizedSampler())
        self._track_trackable(self._sampler, name="sampler")
        self.average_gradients = average_gradients
        self._comm = comm
        self._loss_spec: Any = None

    @property
    def sampler(self) -> PrioritizedSampler:
        """The priority table and schedule of this rank."""
        return self._sampler

    @property
    def comm(self) -> Communicator:
        """The communicator (created on first use)."""
        if self._comm is None:
            self._comm = default_comm()
        return self._comm

    def call(self, inputs: Any, training: bool | None = None, mask: Any = None) -> Any:
        """The wrapped model's output."""
        return self.model(inputs, training=training)

    def compile(self, optimizer: Any = "rmsprop", loss: Any = None, **kwargs: Any) -> None:
        """``tf.keras.Model.compile``; ``loss`` must be a single loss (needed per example)."""
        super().compile(optimizer=optimizer, loss=loss, **kwargs)
        self._loss_spec = loss

    def fit(self, x: Any = None, y: Any = None, batch_size: int | None = None, epochs: int = 1,
            steps_per_epoch: int | None = None, **kwargs: Any) -> tf.keras.callbacks.History:
        """Train on this rank's shard ``(x, y)`` with prioritized SGD.

        Args:
            x: inputs of this rank's shard (NumPy or tensor, indexable). ``None`` continues with
                the shard of the previous call.
            y: targets of the shard.
            batch_size: must be ``None``: the step's examples are set by ``k`` (and ``r``).
            epochs: number of epochs.
            steps_per_epoch: steps per epoch, the same on every rank (default ⌈n/K⌉ with
                n = Σ_j n_j and K = Σ_j K_j: one data set's worth of selected examples).
            **kwargs: other ``tf.keras.Model.fit`` arguments (callbacks, validation_data, ...).

        Returns:
            The Keras ``History``.

        Raises:
            ValueError: if ``batch_size`` is set, ``x`` is a dataset, or ``y`` is missing.
            RuntimeError: if ``compile`` was not called, or ``x`` is ``None`` on the first call.
        """
        if batch_size is not None:
            raise ValueError("`batch_size` must be None: PrioritizedModel trains on "
                             f"k·n_local examples per step. Received: batch_size={batch_size}")
        if isinstance(x, tf.data.Dataset) or (x is not None and y is None):
            raise ValueError("`x` and `y` must be indexable arrays of this rank's shard (not a "
                             f"dataset or generator). Received: x={type(x).__name__}, y={y!r}")
        if self._loss_spec is None:
            raise RuntimeError("Call `compile(optimizer, loss)` before `fit`.")
        sampler = self.sampler
        if x is not None:
            sampler.bind(self.model, self._loss_spec, x, y, self.comm)
            self.train_function = None  # the table variables are new: retrace
        elif not sampler.is_bound:
            raise RuntimeError("The first `fit` call needs this rank's shard: fit(x, y, ...).")
        if not sampler.is_initialized:
            self._broadcast_weights()
            sampler.initialize()
        # Every rank must take the same number of steps (each step has collectives).
        steps = steps_per_epoch or math.ceil(sum(sampler.shard_sizes)
                                             / sampler.num_selected_total)
        return super().fit(tf.data.Dataset.range(steps), epochs=epochs, **kwargs)

    def _broadcast_weights(self) -> None:
        if self.comm.size == 1:
            return
        for i, v in enumerate(self.model.variables):
            v.assign(self.comm.broadcast(v.value(), 0, name=f"dho2/prioritized/bcast/{i}"))

    def _should_average(self) -> bool:
        if self.average_gradients is not None:
            return bool(self.average_gradients)
        return not isinstance(getattr(self.optimizer, "comm", None), Communicator)

    def train_step(self, data: Any) -> dict[str, tf.Tensor]:
        """One PSGD step: refresh, select, weighted gradient, (average), apply, advance.

        A light step (see :class:`PrioritizedSampler`, ``bookkeeping_interval``) draws uniform
        indices and skips the scores, the table scatter and τ. The step's in-graph time, from
        ``tf.timestamp`` before the selection to after the update and the bookkeeping, is
        added to the sampler's light or full step totals (the measured cost ratio ĉ).
        """
        del data  # the step's examples come from the sampler
        sampler = self.sampler
        full = sampler.is_full_step()
        started = tf.timestamp()
        with tf.control_dependencies([started]):
            refreshed = sampler.refresh()
            idx, weights = sampler.select(full)
        x, y, weights = sampler.training_batch(idx, weights, refreshed)
        batch = tf.cast(tf.shape(weights)[0], tf.float32)
        free = sampler.refresh_mode == "free"
        with tf.GradientTape() as tape:
            y_pred, cache = self._training_forward(x, free)
            # Keras divides the weighted sum by the batch size: scale so the loss is Σ w·ℓ.
            loss = self.compute_loss(x, y, y_pred, sample_weight=weights * batch)
        variables = self.model.trainable_variables
        grads = tape.gradient(loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        done = [idx]
        if free:  # the batch's priorities at the weights of this step, before the update
            done.append(sampler.refresh_from_step(idx, y, weights, y_pred, cache, full))
        if self._should_average() and self.comm.size > 1:
            grads = self.comm.grouped_allreduce(grads, "mean", name="dho2/prioritized/gradients")
        self.optimizer.apply_gradients(zip(grads, variables))
        # Reads of the updated weights are ordered after their updates (same resource).
        with tf.control_dependencies(done + [v.read_value() for v in variables]):
            sampler.record_step_time(full, tf.timestamp() - started)
        sampler.advance()
        return self.compute_metrics(x, y, y_pred, tf.cast(weights > 0, tf.float32))

    def _training_forward(self, x: tf.Tensor, free: bool
                          ) -> tuple[tf.Tensor, tuple[tf.Tensor, tf.Tensor] | None]:
        """``(y_pred, cache)`` of the training forward pass.

        With ``refresh="free"`` and a last-layer scorer the forward pass is split at the last
        Dense layer, y = act(a·K + b), so its features a and pre-activations z are kept
        (``cache = (a, z)``) for the free priority refresh; otherwise ``cache`` is ``None``.
        """
        scorer = self.sampler.scorer
        if free and isinstance(scorer, LastLayerScorer):
            a = scorer.features(x, training=True)
            z = scorer.pre_activation(a)
            return scorer.layer.activation(z), (a, z)
        return self(x, training=True), None

    def get_config(self) -> dict[str, Any]:
        """Wrapped model, sampler config and ``average_gradients`` (the shard is not config)."""
        return {"model": tf.keras.utils.serialize_keras_object(self.model),
                "sampler": self.sampler.get_config(),
                "average_gradients": self.average_gradients,
                "name": self.name}

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None
                    ) -> "PrioritizedModel":
        """Inverse of :meth:`get_config`."""
        config = dict(config)
        model = tf.keras.utils.deserialize_keras_object(config.pop("model"),
                                                        custom_objects=custom_objects)
        sampler = PrioritizedSampler.from_config(config.pop("sampler"))
        return cls(model, sampler, **config)
