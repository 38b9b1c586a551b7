"""One training run from its configuration: what ``jobs/train.py`` and the benchmarks call.

The run builds the dataset (sharded by rank), the model, the optimizer (DHO2 or a Horovod
data-parallel Keras baseline) and the callbacks, trains with ``model.fit`` and returns the
history of test accuracy and full training-set loss against training wall time. The model's
objective (``models.objective``) says what it is trained on: classifiers on the labels with
softmax cross-entropy, the autoencoder on its own inputs with sigmoid cross-entropy. Logs and
the progress bar appear on rank 0 only. Configurations come from code, from flags or from a
YAML/JSON file (:func:`~dho2_tf.training.config_values.load_config_file`,
:meth:`TrainConfig.from_dict`).

Before the first training collective the ranks compare the run's fingerprint
(:func:`run_fingerprint`: every configuration field that must agree, samples per rank, steps per
epoch, global batch and the model's variable shapes) and stop together on any difference. The checkpoint directory is
validated before the data is loaded, an existing checkpoint is only continued (``resume``) or
explicitly replaced (``overwrite``), and a resume refuses configuration changes that would
change the training (:func:`check_resume_compatible`) unless ``allow_config_change`` names them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf

from dho2_tf.callbacks import (BroadcastInitialState, CurvatureRefresh, ReplicaSync,
                               TestAccuracyClock, curvature_batch_from_arrays)
from dho2_tf.consistency import (RunConsistencyError, build_fingerprint, check_run_consistency,
                                 describe_ranks)
from dho2_tf.training.checkpoint_lock import acquire_lock, release_lock
from dho2_tf.training.config_values import coerce, field_types
from dho2_tf.training.dho2_arguments import (ARGUMENT_NAMES, DHO2_DEFAULTS, SECTION_KEY,
                                             DHO2Arguments, split_section, upgrade_run_record)
from dho2_tf.training.checkpointing import (CheckpointError, CheckpointInfo, EpochCheckpoint,
                                            check_checkpoint_dir, clean_pending,
                                            config_changes, read_checkpoints)
from dho2_tf.training.data import (DATASETS, check_cifar_path, cifar_augment, content_hash,
                                   load_dataset, make_tf_dataset, shard_arrays)
from dho2_tf.distributed.comm import Communicator, Group, default_comm
from dho2_tf.modes import mode_class
from dho2_tf.training.monitoring import TensorBoardMonitor
from dho2_tf.optimizer import DHO2
from dho2_tf.validation import check_int, check_real

if TYPE_CHECKING:
    from dho2_tf.models import Objective

logger = logging.getLogger(__name__)

OPTIMIZERS = ("dho2", "adam", "sgd", "momentum")
SCHEDULES = ("constant", "cosine")
IMAGE_MODELS = ("resnet20", "resnet32", "resnet56", "resnet110")
# Fields that may differ between ranks: host-local paths and rank-0 logging.
RANK_LOCAL_FIELDS = ("verbose", "data_dir", "tensorboard_dir")
# Fields a resume may change freely: they do not change what is trained or how.
RESUME_FREE_FIELDS = RANK_LOCAL_FIELDS + ("checkpoint_dir", "resume", "overwrite",
                                          "allow_config_change", "target_accuracy",
                                          "target_loss", "keep_checkpoints",
                                          "max_skipped_fraction", "resume_from")
# Per-rank layout: a resume on another number of ranks compares the global batch instead.
LAYOUT_KEYS = ("ranks", "batch_size", "samples_per_rank")


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run needs; field names are the CLI flags of ``jobs/train.py``.

    DHO2's arguments form one section, ``dho2`` (:class:`DHO2Arguments`), with DHO2's own
    defaults; each is also a flag of ``jobs/train.py`` (``--k``, ``--eigenvalue-damping``) and a
    key of a config file, nested under ``dho2:`` or at the top level. ``learning_rate``,
    ``momentum`` and ``seed``, which DHO2 takes too, are fields of the run, defaulting to
    DHO2's defaults (they also set the baselines and the data order).

    Attributes:
        model: registry name (``models.available()``).
        dataset: ``mnist1d``, ``digits``, ``mnist5k``, ``cifar10`` or ``cifar100``.
            ``digits`` and ``mnist5k`` are fed as 8×8×1 / 28×28×1 images to the 2-D ResNets, as
            flat vectors otherwise; CIFAR training images are augmented (reflect-pad 4, random
            crop, flip).
        data_dir: folder of the CIFAR python-pickle files.
        num_samples: MNIST-1D samples to generate, or the size of the balanced ``mnist5k``
            subset (at most 5000); 80% train.
        optimizer: ``dho2`` or a data-parallel baseline: ``adam``, ``sgd``, ``momentum``.
        learning_rate: peak (base) learning rate.
        schedule: ``constant`` or ``cosine`` decay over the whole run.
        epochs: maximum number of epochs.
        batch_size: per-rank batch size (global batch B = training ranks × batch_size; step
            t reads global batch t of :mod:`~dho2_tf.data_position`, the same for
            any number of ranks with the same B).
        weight_decay: L2 coefficient put into the model's loss.
        momentum: momentum of ``momentum``/``nesterov`` (DHO2 base and baseline).
        dho2: DHO2's arguments (base rule, k, ℓ, α, refresh interval, mode, ...), as
            :class:`dho2_tf.DHO2` takes them; ``warmup=None`` means ``refresh_every``.
        refresh_every_epochs: DHO2 refresh interval in epochs; overrides
            ``dho2.refresh_every``.
        curvature_batch: global curvature-batch size (at most the training rows): the same
            rows for any number of ranks, split across them
            (:func:`~dho2_tf.callbacks.curvature_batch_from_arrays` with ``seed``).
        seed: seed of weights, data order (batches, curvature batch, prioritized shards) and
            Lanczos.
        target_accuracy: stop at this test accuracy (models with an accuracy metric).
        target_loss: stop at this loss of the full training set (evaluated after each epoch
            with the clock stopped; regularisation terms included).
        prioritized: train with prioritized SGD (``dho2_tf.prioritized``).
        prioritized_k, prioritized_r: fractions of the shard selected / re-scored per step.
        tensorboard_dir: write TensorBoard event files here (rank 0).
        checkpoint_dir: save a checkpoint here after every epoch (rank 0 writes). A checkpoint
            already there is refused unless ``resume`` or ``overwrite`` is set.
        resume: continue from the checkpoint in ``checkpoint_dir`` if there is one (the
            newest good one, or ``resume_from``).
        resume_from: the folder name (``ckpt-...``) of the checkpoint a resume continues,
            instead of the newest good one (e.g. one marked bad).
        keep_checkpoints: how many of the newest checkpoints to keep; the newest good one is
            kept in addition (docs/reliability.md).
        max_skipped_fraction: an epoch with more than this fraction of its steps skipped
            (non-finite updates), or a non-finite loss, writes a checkpoint marked bad, which
            never displaces the last good one.
        overwrite: start afresh and replace the checkpoint in ``checkpoint_dir`` (the old one
            is deleted only once the first new one is committed).
        allow_config_change: comma-separated keys a resume may change deliberately (e.g.
            ``learning_rate,epochs``; a DHO2 argument bare or as ``dho2.<name>``); any other
            change from the checkpoint's run is refused.
        verbose: Keras verbosity on rank 0 (0, 1 progress bar, 2 one line per epoch).
    """

    model: str = "mlp"
    dataset: str = "mnist1d"
    data_dir: str | None = None
    num_samples: int = 5000
    optimizer: str = "dho2"
    learning_rate: float = DHO2_DEFAULTS["learning_rate"]
    schedule: str = "cosine"
    epochs: int = 60
    batch_size: int = 50
    weight_decay: float = 3e-4
    momentum: float = DHO2_DEFAULTS["momentum"]
    dho2: DHO2Arguments = dataclasses.field(default_factory=DHO2Arguments)
    refresh_every_epochs: int | None = None
    curvature_batch: int = 500
    seed: int = DHO2_DEFAULTS["seed"]
    target_accuracy: float | None = None
    target_loss: float | None = None
    prioritized: bool = False
    prioritized_k: float = 0.05
    prioritized_r: float = 0.01
    tensorboard_dir: str | None = None
    checkpoint_dir: str | None = None
    resume: bool = False
    resume_from: str | None = None
    keep_checkpoints: int = 2
    max_skipped_fraction: float = 0.5
    overwrite: bool = False
    allow_config_change: str | None = None
    verbose: int = 1

    @classmethod
    def field_types(cls) -> dict[str, str]:
        """Field name → annotation string (``"int"``, ``"float | None"``, ...)."""
        return field_types(cls)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config",
                  start: "TrainConfig | None" = None) -> "TrainConfig":
        """A config from a mapping of keys (``-`` or ``_``) to values, types coerced.

        DHO2's arguments may sit in a nested ``dho2`` mapping, at the top level or in the older
        ``dho2_options`` mapping (:func:`~dho2_tf.training.dho2_arguments.split_section`).
        Keys not in ``values`` keep their value in ``start`` (default: the defaults).

        Raises:
            ValueError: on an unknown key (the message lists the valid ones), a DHO2 argument
                set twice, or a value that does not convert to the field's type.
        """
        start = cls() if start is None else start
        rest, arguments = split_section(values, source)
        types = {name: annotation for name, annotation in cls.field_types().items()
                 if name != SECTION_KEY}
        out: dict[str, Any] = {}
        for key, value in rest.items():
            if key not in types:
                raise ValueError(f"Unknown key {key!r} in {source}. Valid keys: "
                                 f"{', '.join(sorted(types))}, DHO2's arguments "
                                 f"({', '.join(ARGUMENT_NAMES)}) and a `dho2` mapping of them")
            out[key] = coerce(key, types[key], value)
        return dataclasses.replace(start, **out, dho2=start.dho2.updated(arguments, source))

    def validate(self) -> None:
        """Raise ValueError on any bad field, before data is loaded or a collective runs."""
        from dho2_tf import models

        choices = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "dataset": DATASETS,
                   "model": tuple(models.available())}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` must be one of {tuple(allowed)}. "
                                 f"Received: {name}={getattr(self, name)!r}")
        for name in ("epochs", "batch_size", "curvature_batch", "num_samples"):
            check_int(name, getattr(self, name), minimum=1)
        check_int("verbose", self.verbose, minimum=0, maximum=2)
        if self.refresh_every_epochs is not None:
            check_int("refresh_every_epochs", self.refresh_every_epochs, minimum=1)
        check_real("learning_rate", self.learning_rate, minimum=0.0, open_min=True)
        check_real("weight_decay", self.weight_decay, minimum=0.0)
        if self.dataset == "mnist5k" and (self.num_samples % 10 or self.num_samples > 5000):
            raise ValueError("`num_samples` must be a multiple of 10 in [10, 5000] for "
                             f"dataset='mnist5k'. Received: num_samples={self.num_samples}")
        self._validate_objective(models.objective(self.model))
        if self.dataset.startswith("cifar") and not self.data_dir:
            raise ValueError(f"`data_dir` must name the folder of the CIFAR files for "
                             f"dataset={self.dataset!r}. Received: data_dir={self.data_dir!r}")
        check_int("keep_checkpoints", self.keep_checkpoints, minimum=1)
        check_real("max_skipped_fraction", self.max_skipped_fraction, minimum=0.0,
                   maximum=1.0)
        if self.resume_from is not None and not self.resume:
            raise ValueError("`resume_from` names the checkpoint a resume continues; set "
                             f"`resume`. Received: resume_from={self.resume_from!r}")
        if self.resume and not self.checkpoint_dir:
            raise ValueError("`resume` needs `checkpoint_dir`. Received: resume=True, "
                             "checkpoint_dir=None")
        if self.overwrite and (self.resume or not self.checkpoint_dir):
            raise ValueError("`overwrite` replaces the checkpoint in `checkpoint_dir` and "
                             "excludes `resume`. Received: overwrite=True, resume="
                             f"{self.resume}, checkpoint_dir={self.checkpoint_dir!r}")
        if self.allow_config_change and not self.resume:
            raise ValueError("`allow_config_change` applies to a resume; set `resume`. "
                             f"Received: allow_config_change={self.allow_config_change!r}")
        if self.prioritized:
            make_sampler(self)  # validates k and r
        if self.optimizer == "dho2":
            mode = mode_class(self.dho2.mode)
            for name, supported in (("checkpoint_dir", mode.checkpointable),
                                    ("prioritized", mode.all_ranks_train)):
                if getattr(self, name) and not supported:
                    raise ValueError(f"`{name}` is not supported with mode={self.dho2.mode!r} (the "
                                     f"curvature ranks do not train). Received: "
                                     f"{name}={getattr(self, name)!r}")
        if self.optimizer == "dho2":
            self.make_dho2(learning_rate=self.learning_rate, comm=None)  # validates DHO2 args

    def _validate_objective(self, objective: Objective) -> None:
        """The targets (``target_accuracy`` / ``target_loss``) against the model's objective."""
        if self.target_accuracy is not None:
            check_real("target_accuracy", self.target_accuracy, minimum=0.0, maximum=1.0)
            if not objective.has_accuracy:
                raise ValueError(f"`target_accuracy` needs a model with an accuracy metric; "
                                 f"model={self.model!r} is trained on {objective.name} (use "
                                 f"`target_loss`). Received: target_accuracy="
                                 f"{self.target_accuracy}")
        if self.target_loss is not None:
            check_real("target_loss", self.target_loss, minimum=0.0, open_min=True)
            if self.target_accuracy is not None:
                raise ValueError("Set at most one of `target_accuracy` and `target_loss`. "
                                 f"Received: target_accuracy={self.target_accuracy}, "
                                 f"target_loss={self.target_loss}")
        if objective.targets_are_inputs and self.dataset.startswith("cifar"):
            raise ValueError(f"model={self.model!r} reconstructs its input, which the CIFAR "
                             f"augmentation would change. Received: dataset={self.dataset!r}")

    def make_dho2(self, learning_rate: Any, comm: Communicator | None,
                  steps_per_epoch: int | None = None) -> DHO2:
        """The DHO2 optimizer this configuration describes: ``DHO2(learning_rate, momentum,
        seed, comm, **dho2)``, with ``refresh_every`` from ``refresh_every_epochs`` when both
        it and ``steps_per_epoch`` are given."""
        arguments = self.dho2.keywords()
        if self.refresh_every_epochs is not None and steps_per_epoch is not None:
            arguments["refresh_every"] = self.refresh_every_epochs * steps_per_epoch
        return DHO2(learning_rate=learning_rate, momentum=self.momentum, seed=self.seed,
                    comm=comm, **arguments)


@dataclasses.dataclass
class TrainResult:
    """Outcome of :func:`train`.

    Attributes:
        test_accuracy: final test accuracy.
        best_accuracy: best test accuracy over epochs.
        train_seconds: training wall time (evaluation excluded).
        wall_seconds: wall time of ``fit``, evaluation included.
        time_to_target: training seconds until ``target_accuracy`` or ``target_loss`` was
            reached, else None.
        history: one dict per epoch (see :class:`~dho2_tf.callbacks.TestAccuracyClock`):
            epoch, seconds, test_accuracy, test_loss, train_loss (full training set) and
            epoch_loss (mean over the epoch's minibatches).
        refreshes: DHO2 refresh records (index, seconds, status, eigenvalues, scale).
        ranks: number of ranks.
        steps_per_epoch: training steps per epoch.
        initial_epoch: epochs already done by the checkpoint this run resumed from.
        train_loss: final loss of the full training set.
        best_train_loss: lowest loss of the full training set over epochs.
        compile_seconds: DHO2's one-off compilation of its curvature graphs at the start of
            training (included in ``train_seconds`` and ``time_to_target``).
        mode: DHO2's resolved distribution mode (``auto`` resolved), None for a baseline.
    """

    test_accuracy: float
    best_accuracy: float
    train_seconds: float
    wall_seconds: float
    time_to_target: float | None
    history: list[dict[str, float]]
    refreshes: list[dict[str, Any]]
    ranks: int
    steps_per_epoch: int = 0
    initial_epoch: int = 0
    train_loss: float = float("nan")
    best_train_loss: float = float("nan")
    compile_seconds: float = 0.0
    mode: str | None = None


def learning_rate_for(config: TrainConfig, total_steps: int) -> Any:
    """A float or a cosine-decay schedule over ``total_steps``."""
    if config.schedule == "cosine":
        return tf.keras.optimizers.schedules.CosineDecay(config.learning_rate, total_steps)
    return config.learning_rate


def make_optimizer(config: TrainConfig, steps_per_epoch: int, comm: Communicator) -> Any:
    """DHO2, or a Keras first-order optimizer made data-parallel by the communicator."""
    lr = learning_rate_for(config, steps_per_epoch * config.epochs)
    if config.optimizer == "dho2":
        return config.make_dho2(lr, comm, steps_per_epoch)
    if config.optimizer == "adam":
        base = tf.keras.optimizers.Adam(learning_rate=lr)
    else:
        base = tf.keras.optimizers.SGD(learning_rate=lr, momentum=config.momentum
                                       if config.optimizer == "momentum" else 0.0)
    return comm.data_parallel_optimizer(base)


def make_sampler(config: TrainConfig) -> Any:
    """The ``PrioritizedSampler`` of a ``prioritized`` run."""
    from dho2_tf.prioritized import PrioritizedSampler

    return PrioritizedSampler(k=config.prioritized_k, r=config.prioritized_r, seed=config.seed)


def pipeline_groups(config: TrainConfig, world_size: int) -> Any:
    """Which ranks train and which compute curvature in this run (the mode's ``rank_groups``),
    ``None`` when every rank trains."""
    if config.optimizer != "dho2":
        return None
    dho2 = config.dho2
    return mode_class(dho2.mode).rank_groups(world_size, dho2.curvature_ranks, dho2.update_ranks)


def make_comm(config: TrainConfig) -> Communicator:
    """The run's communicator, registering at start-up the process sets its mode needs.

    The settings the sets derive from (optimizer, DHO2 mode, curvature and update ranks) are
    named in the :class:`dho2_tf.consistency.RunConsistencyError` raised on every rank when
    the ranks want different sets (see :class:`dho2_tf.distributed.comm.HorovodComm`).
    """
    if config.optimizer != "dho2":
        return default_comm(requested_by={"optimizer": config.optimizer})
    curvature_ranks, update_ranks = config.dho2.curvature_ranks, config.dho2.update_ranks
    return default_comm(
        process_sets=mode_class(config.dho2.mode).process_sets_for(curvature_ranks, update_ranks),
        requested_by={"optimizer": config.optimizer, "mode": config.dho2.mode,
                      "curvature_ranks": curvature_ranks, "update_ranks": update_ranks})


def training_group(config: TrainConfig, comm: Communicator) -> Any:
    """The process set of the ranks that run ``fit`` (``None``: all ranks)."""
    groups = pipeline_groups(config, comm.size)
    if groups is None:
        return None
    update = groups.update
    if len(update) == 1:
        return Group(update)  # one training rank: nothing to synchronise
    return comm.group(update) if len(update) < comm.size else None


def data_ranks(config: TrainConfig, comm: Communicator) -> tuple[Any, bool]:
    """``(rank info for sharding the data, is this a training rank)``.

    All ranks train and share the data, except in pipelined DHO2, where the update ranks share
    the training data and the curvature ranks share the curvature batch.
    """
    groups = pipeline_groups(config, comm.size)
    if groups is None:
        return comm, True
    from types import SimpleNamespace

    ranks = groups.update if comm.rank in groups.update else groups.curvature
    return SimpleNamespace(rank=ranks.index(comm.rank), size=len(ranks)), \
        comm.rank in groups.update


def load_data(config: TrainConfig) -> Any:
    """The :class:`dho2_tf.training.data.Dataset` of ``config``."""
    if config.dataset == "mnist1d":
        return load_dataset("mnist1d", num_samples=config.num_samples)
    if config.dataset == "digits":
        return load_dataset("digits", as_images=config.model in IMAGE_MODELS)
    if config.dataset == "mnist5k":
        return load_dataset("mnist5k", num_samples=config.num_samples,
                            as_images=config.model in IMAGE_MODELS)
    return load_dataset(config.dataset, path=config.data_dir)


def _callbacks(config: TrainConfig, comm: Communicator,
               curvature_batch: tuple[np.ndarray, np.ndarray] | None,
               clock: TestAccuracyClock, resumed: CheckpointInfo | None,
               fingerprint: dict[str, Any] | None = None
               ) -> tuple[list[tf.keras.callbacks.Callback], CurvatureRefresh | None]:
    """Callbacks in the order they must run: initial broadcast / curvature, resume, clock, logs."""
    callbacks: list[tf.keras.callbacks.Callback] = []
    curvature = None
    if config.optimizer == "dho2":
        curvature = CurvatureRefresh(batch=curvature_batch)
        callbacks.append(curvature)
    elif not config.prioritized:  # PrioritizedModel broadcasts the weights itself
        callbacks.append(BroadcastInitialState(comm))
    group = training_group(config, comm)
    if comm.group_size(group) > 1:
        callbacks += [ReplicaSync(comm, group, "before"), clock, ReplicaSync(comm, group, "after")]
    else:
        callbacks.append(clock)
    if config.checkpoint_dir:
        callbacks.append(EpochCheckpoint(
            config.checkpoint_dir, comm, resume=resumed is not None, overwrite=config.overwrite,
            run_config=fingerprint, keep=config.keep_checkpoints,
            max_skipped_fraction=config.max_skipped_fraction,
            resume_from=resumed.name if resumed is not None else None))
    if config.tensorboard_dir:
        callbacks.append(TensorBoardMonitor(config.tensorboard_dir, comm))
    return callbacks, curvature


def _rank_problems(problems: list[str]) -> str:
    """One message from every rank's problem text, prefixed by its ranks when not all agree."""
    if all(p == problems[0] for p in problems):
        return problems[0]
    ranks: dict[str, list[int]] = {}
    for rank, text in enumerate(problems):
        if text:
            ranks.setdefault(text, []).append(rank)
    return "\n".join(f"rank {','.join(map(str, r))}: {text}" for text, r in ranks.items())


def _describe_checkpoint(identity: dict[str, Any] | None) -> str:
    if identity is None:
        return "no checkpoint"
    return (f"{identity['name']} (epoch {identity['epoch']}, step {identity['step']}, run "
            f"{identity['run']})")


def _resume_target(config: TrainConfig, comm: Communicator) -> CheckpointInfo | None:
    """This rank's part of :func:`validated_checkpoint_dir` (raises on any problem)."""
    directory = config.checkpoint_dir
    if comm.is_root and os.path.isdir(directory):
        acquire_lock(directory)   # before anything in the directory is changed
        try:
            owned = {c.name for c in read_checkpoints(directory)}
        except CheckpointError:
            owned = None
        if owned is not None:
            for folder in clean_pending(directory, owned):
                logger.warning("Removed %s, left behind by a checkpoint write that did not "
                               "commit.", os.path.join(directory, folder))
    target = check_checkpoint_dir(directory, resume=config.resume, overwrite=config.overwrite,
                                  resume_from=config.resume_from)
    if comm.is_root:
        acquire_lock(directory)   # re-entrant; the directory exists now
    if target is not None and target.epoch >= config.epochs:
        raise CheckpointError(f"The checkpoint {target.name} in {directory} has already "
                              f"completed {target.epoch} epochs; `epochs` must exceed that to "
                              f"resume. Received: epochs={config.epochs}")
    return target


def validated_checkpoint_dir(config: TrainConfig, comm: Communicator) -> CheckpointInfo | None:
    """Check ``checkpoint_dir`` (and a CIFAR ``data_dir``) on every rank; the checkpoint to
    resume from, or None.

    Rank 0 first takes the directory's lock (one run per directory) and removes the folders
    of a checkpoint write that never committed. Collective (one ``allgather_object``, issued
    by every rank whatever its configuration, before the data is loaded): every rank sends the
    problem it found and the identity (name, epoch, step, run digest) of the checkpoint it
    would resume, so that a problem on any rank, or ranks seeing different checkpoints (storage
    not shared), stop every rank here together.

    Raises:
        CheckpointError: the problems found, each prefixed by its ranks when not all agree
            (including resuming with ``epochs`` not above the checkpoint's).
        ValueError: the same, when a rank's ``data_dir`` lacks the CIFAR files.
        RunConsistencyError: when the ranks would resume different checkpoints (or some none).
    """
    target, problem, kind = None, "", "checkpoint"
    try:
        if config.dataset.startswith("cifar"):   # a host-local path: checked on every rank
            kind = "data"
            check_cifar_path(config.dataset, config.data_dir)
            kind = "checkpoint"
        if config.checkpoint_dir:
            target = _resume_target(config, comm)
    except ValueError as err:
        problem = str(err)
    mine = {"problem": problem, "kind": kind,
            "checkpoint": target.identity() if target else None}
    everyone = comm.allgather_object(mine, name="dho2/checkpoint/validate")
    problems = [seen["problem"] for seen in everyone]
    seen = [seen["checkpoint"] for seen in everyone]
    try:
        if any(problems):
            kinds = {s.get("kind", "checkpoint") for s in everyone if s["problem"]}
            error = CheckpointError if kinds == {"checkpoint"} else ValueError
            raise error(_rank_problems(problems))
        if any(s != seen[0] for s in seen):
            described = [_describe_checkpoint(s) for s in seen]
            raise RunConsistencyError(
                f"Ranks disagree on the checkpoint to resume from {config.checkpoint_dir} "
                "(every rank must see the same one; put --checkpoint-dir on storage every "
                f"rank shares):\n  checkpoint: {describe_ranks(described)}",
                {"checkpoint": described})
    except ValueError:
        if comm.is_root and config.checkpoint_dir:
            release_lock(config.checkpoint_dir)
        raise
    if config.resume and target is None and comm.is_root:
        logger.warning("No checkpoint in %s yet: starting from scratch.", config.checkpoint_dir)
    return target


def run_fingerprint(config: TrainConfig, comm: Communicator, model: tf.keras.Model,
                    samples_per_rank: int, steps_per_epoch: int, training_examples: int,
                    training_ranks: int, data_hash: str | None = None) -> dict[str, Any]:
    """Everything the ranks of a run must agree on, as a flat JSON-serialisable mapping.

    Keys: every :class:`TrainConfig` field but :data:`RANK_LOCAL_FIELDS` (the DHO2 section
    flattened to ``dho2.<name>``, one key per DHO2 argument), ``ranks``, ``training_examples``,
    ``global_batch`` (= training ranks × ``batch_size``), ``num_trainable_variables`` and
    ``variable[i]`` (shape and dtype), plus ``samples_per_rank`` and ``steps_per_epoch``
    when every rank trains (pipelined curvature ranks hold another share), and
    ``training_data``, the content hash of the whole dataset before sharding
    (:func:`~dho2_tf.training.data.content_hash`), when ``data_hash`` is given.
    """
    values = {k: v for k, v in dataclasses.asdict(config).items() if k not in RANK_LOCAL_FIELDS}
    facts = {"ranks": comm.size, "training_examples": int(training_examples),
             "global_batch": int(training_ranks * config.batch_size)}
    if pipeline_groups(config, comm.size) is None:
        facts.update({"samples_per_rank": int(samples_per_rank),
                      "steps_per_epoch": int(steps_per_epoch)})
    return build_fingerprint(values, facts, model.trainable_variables, data_hash)


def allowed_change_key(key: str) -> str:
    """The fingerprint key ``--allow-config-change`` means by ``key``: a DHO2 argument may be
    named bare (``refresh_every``) or as ``dho2.refresh_every``."""
    key = key.replace("-", "_")
    return f"{SECTION_KEY}.{key}" if key in ARGUMENT_NAMES else key


def check_resume_compatible(info: CheckpointInfo, fingerprint: dict[str, Any],
                            config: TrainConfig, comm: Communicator) -> None:
    """Refuse to resume ``info`` when the run configuration changed in a way that matters.

    Compared: every key of the recorded and the current :func:`run_fingerprint` except
    :data:`RESUME_FREE_FIELDS` and the per-rank :data:`LAYOUT_KEYS` (another number of ranks
    is fine when ``global_batch`` and ``steps_per_epoch`` are kept, so the learning-rate
    schedule is the same), and ``epochs`` under a constant schedule. Keys listed in
    ``config.allow_config_change`` may change (logged on rank 0).

    Raises:
        CheckpointError: naming each changed key with the checkpoint's and this run's value,
            how to keep the global batch on this number of ranks when it changed, and the
            ``--allow-config-change`` that would accept the changes.
    """
    if info.run is None:
        if comm.is_root:
            logger.warning("The checkpoint in %s records no run configuration (written by an "
                           "older version): configuration changes cannot be checked.",
                           config.checkpoint_dir)
        return
    info = dataclasses.replace(info, run=upgrade_run_record(info.run))
    ignore = RESUME_FREE_FIELDS + LAYOUT_KEYS
    known = (set(info.run) | set(fingerprint)) - set(ignore)
    if config.schedule == "constant" and info.run.get("schedule") == "constant":
        ignore += ("epochs",)   # no schedule depends on it (allowed, and also free)
    if "training_data" not in info.run:   # written before the data's content was recorded
        ignore += ("training_data",)
    changes = config_changes(info.run, fingerprint, ignore)
    allowed = [allowed_change_key(k.strip())
               for k in (config.allow_config_change or "").split(",") if k.strip()]
    unknown = [k for k in allowed if k not in known]
    if unknown:
        raise CheckpointError(f"`allow_config_change` names unknown key(s) {unknown}. Valid "
                              f"keys: {', '.join(sorted(known))}")
    refused = {k: v for k, v in changes.items() if k not in allowed}
    if refused:
        lines = [f"  {key}: checkpoint {old!r}, this run {new!r}"
                 for key, (old, new) in refused.items()]
        hint = ""
        if "global_batch" in refused:
            saved_ranks, saved_global = info.run.get("ranks"), info.run.get("global_batch")
            hint = (f"\nThe checkpoint was written by {saved_ranks} rank(s) x batch_size "
                    f"{info.run.get('batch_size')} (global batch {saved_global}); ")
            ranks = fingerprint["global_batch"] // max(1, config.batch_size)
            if isinstance(saved_global, int) and saved_global % ranks == 0:
                hint += (f"on {ranks} training rank(s) pass --batch-size "
                         f"{saved_global // ranks} to keep the global batch and the "
                         "learning-rate schedule.")
            else:
                hint += (f"no per-rank batch size gives that global batch on {ranks} "
                         "rank(s); resume on a number of ranks that divides it.")
        raise CheckpointError(
            f"Resuming the checkpoint in {config.checkpoint_dir} would change the run:\n"
            + "\n".join(lines) + hint + "\nRun with the checkpoint's values, or allow the "
            f"changes deliberately with --allow-config-change {','.join(refused)}.")
    if comm.is_root:
        for key, (old, new) in changes.items():
            logger.warning("Resuming with a deliberate change of %s: %r -> %r", key, old, new)
        if info.run.get("ranks") != comm.size:
            logger.info("Resuming on %d rank(s) a checkpoint written by %s: global batch %s "
                        "and %s steps per epoch kept.", comm.size, info.run.get("ranks"),
                        fingerprint["global_batch"], fingerprint.get("steps_per_epoch"))


def serve_curvature(model: tf.keras.Model, batch: tuple[Any, Any],
                    comm: Communicator, steps_per_epoch: int) -> TrainResult:
    """Pipelined DHO2 on a curvature rank: compute eigenpairs until the update ranks stop."""
    start = time.perf_counter()
    model.optimizer.bind(model, None, batch)
    served = model.optimizer.serve_curvature()
    wall = time.perf_counter() - start
    return TrainResult(test_accuracy=float("nan"), best_accuracy=float("nan"),
                       train_seconds=wall, wall_seconds=wall, time_to_target=None, history=[],
                       refreshes=served, ranks=comm.size, steps_per_epoch=steps_per_epoch)


def train(config: TrainConfig, comm: Communicator | None = None,
          extra_callbacks: list[tf.keras.callbacks.Callback] | None = None) -> TrainResult:
    """Train one model as ``config`` says; every rank must call it with the same config.

    Raises (on every rank, before training):
        ValueError: on a bad field (:meth:`TrainConfig.validate`).
        CheckpointError: on an unusable checkpoint directory, an existing checkpoint without
            ``resume``/``overwrite``, an incompatible resume or an unreadable checkpoint file.
        RunConsistencyError: when the ranks' :func:`run_fingerprint` differ (training data
            included, by content) or they would resume different checkpoints.
    """
    config.validate()
    comm = comm or make_comm(config)
    resumed = validated_checkpoint_dir(config, comm)
    try:
        return _train(config, comm, resumed, extra_callbacks)
    finally:
        if config.checkpoint_dir and comm.is_root:
            release_lock(config.checkpoint_dir)


def _train(config: TrainConfig, comm: Communicator, resumed: CheckpointInfo | None,
           extra_callbacks: list[tf.keras.callbacks.Callback] | None) -> TrainResult:
    """:func:`train` after the checkpoint directory was validated (and locked)."""
    from dho2_tf import models

    data = load_data(config)
    objective = models.objective(config.model)
    y_train, y_test = (objective.targets(x, y) for x, y in ((data.x_train, data.y_train),
                                                             (data.x_test, data.y_test)))
    tf.keras.utils.set_random_seed(config.seed)
    model = models.get(config.model, data.input_shape, data.num_classes,
                       weight_decay=config.weight_decay)
    shard, is_training_rank = data_ranks(config, comm)
    # The data-position rule (data_position): the training ranks read their slices of the run's
    # global batches; prioritized SGD keeps its rank's fixed shard instead.
    n = len(data.x_train)
    training_ranks = shard.size if is_training_rank else comm.size - shard.size
    samples_per_rank = n // shard.size
    if config.prioritized:
        x_r, y_r = shard_arrays(data.x_train, y_train, shard, drop_remainder=True,
                                seed=config.seed)
        steps_per_epoch = -(-len(x_r) // max(1, int(config.prioritized_k * len(x_r))))
    else:
        steps_per_epoch = n // (training_ranks * config.batch_size)
    fingerprint = run_fingerprint(config, comm, model, samples_per_rank, steps_per_epoch,
                                  n, training_ranks, content_hash(data))
    check_run_consistency(comm, fingerprint, what="Training run")  # before training starts
    if steps_per_epoch == 0:
        raise ValueError(f"`batch_size` must not exceed a rank's share of the "
                         f"{n} training examples over {training_ranks} ranks "
                         f"({n // training_ranks}). Received: batch_size={config.batch_size}")
    curvature_batch = None
    if config.optimizer == "dho2":   # the same global rows for any number of ranks
        split = max(training_ranks, comm.size - training_ranks)  # the larger rank group
        if min(config.curvature_batch, n) < split:
            raise ValueError(f"`curvature_batch` must be at least the {split} ranks it is "
                             f"split over. Received: curvature_batch={config.curvature_batch}")
        curvature_batch = curvature_batch_from_arrays(
            data.x_train, y_train, min(config.curvature_batch, n), config.seed, comm=shard)
    if resumed is not None:
        check_resume_compatible(resumed, fingerprint, config, comm)
    if config.prioritized:
        from dho2_tf.prioritized import PrioritizedModel

        model = PrioritizedModel(model, make_sampler(config), comm=comm)
    model.compile(optimizer=make_optimizer(config, steps_per_epoch, comm),
                  loss=objective.make_loss(), metrics=list(objective.metrics))
    if not is_training_rank:
        return serve_curvature(model, curvature_batch, comm, steps_per_epoch)
    clock = TestAccuracyClock(data.x_test, y_test, config.target_accuracy,
                              train_data=(data.x_train, y_train), target_loss=config.target_loss)
    initial_epoch = resumed.epoch if resumed is not None else 0
    callbacks, curvature = _callbacks(config, comm, curvature_batch, clock, resumed,
                                      fingerprint)
    callbacks += extra_callbacks or []
    if comm.is_root:
        logger.info("training %s on %s with %s over %d rank(s), %d steps/epoch", config.model,
                    config.dataset, config.optimizer, comm.size, steps_per_epoch)
    fit_args = {"epochs": config.epochs, "initial_epoch": initial_epoch, "callbacks": callbacks,
                "verbose": config.verbose if comm.is_root else 0}
    start = time.perf_counter()
    if config.prioritized:
        model.fit(x_r, y_r, steps_per_epoch=steps_per_epoch, **fit_args)
    else:
        augment = cifar_augment if config.dataset.startswith("cifar") else None
        stream = make_tf_dataset(data.x_train, y_train, config.batch_size, comm=shard,
                                 seed=config.seed, augment=augment, initial_epoch=initial_epoch)
        model.fit(stream, steps_per_epoch=steps_per_epoch, **fit_args)
    wall = time.perf_counter() - start
    accs = [row["test_accuracy"] for row in clock.history] or [float("nan")]
    losses = [row["train_loss"] for row in clock.history] or [float("nan")]
    return TrainResult(test_accuracy=accs[-1], best_accuracy=float(np.max(accs)),
                       train_loss=losses[-1],
                       best_train_loss=min((v for v in losses if v == v), default=float("nan")),
                       train_seconds=clock.history[-1]["seconds"] if clock.history else wall,
                       wall_seconds=wall, time_to_target=clock.time_to_target,
                       history=clock.history, ranks=comm.size, steps_per_epoch=steps_per_epoch,
                       refreshes=curvature.refreshes if curvature else [],
                       initial_epoch=initial_epoch,
                       compile_seconds=float(getattr(model.optimizer, "compile_seconds", 0.0)
                                             or 0.0),
                       mode=getattr(model.optimizer, "resolved_mode", None))
