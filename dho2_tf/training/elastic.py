"""Horovod Elastic training with DHO2: commit, roll back and re-partition the sharded state.

Under ``horovodrun --min-np/--max-np --host-discovery-script`` workers may fail or join while a
job runs. :func:`elastic_train` runs a custom training loop inside Horovod's elastic driver loop:

* :class:`DHO2ElasticState` keeps, in host memory on every rank, the last *commit*: the model
  weights, ``DHO2.export_state()`` (sharded vectors gathered to full length, so the snapshot does
  not depend on the world size) and the global step. A commit is collective (the export
  gathers) and every rank commits at the same steps (:meth:`ElasticConfig.is_commit_step`).
* After a failed collective (``HorovodInternalError``) every survivor rolls back to the last
  commit; after a membership notice (``HostsUpdatedInterrupt``, raised by a commit right after it
  saved) nothing is rolled back. Either way Horovod re-initialises, the reset callback
  (:meth:`ElasticTrainer.invalidate`) re-reads rank and size, rank 0's commit is broadcast (so
  joining workers get it too), and :meth:`ElasticTrainer.rebuild` makes everything that
  depends on the world size anew: a fresh DHO2 from the same config (its shards have the new
  size) driven by :func:`dho2_tf.training_loop` (the one custom-loop driver: build, rank
  check, ``bind``), ``import_state``, a re-traced train step and the rank's new data slice.
* The data position is the global step, with the rule every run follows
  (:mod:`~dho2_tf.data_position`): step t trains on rows ``π_e[j·B:(j+1)·B]`` of the
  epoch-e permutation (t = e·S + j, B the global batch, S steps per epoch), rank r takes slice
  r of that batch (:func:`rank_rows`), and the fixed curvature batch is the same rows for any
  P, split the same way. Each rank's loss is its slice's *sum* scaled by
  P/B, so the mean over ranks that DHO2 takes is the mean over the whole global batch for any
  P (slices may differ by a row): with ``mode="sharded"`` a run that loses or gains a worker
  follows the same trajectory (up to float summation order) as one that never did.

Note:
    A failed reduce-scatter (DHO2's gradient collective) or a bare Gloo transport error after a
    peer was killed also counts as a failed collective
    (:func:`dho2_tf.distributed.elastic_state.is_horovod_failure`), so the survivors roll back
    instead of crashing. Without elastic flags (plain ``horovodrun`` or one process) the same
    loop runs once, with the same commits.

Job-level failures are the launcher's: ``horovodrun`` waits ``--elastic-timeout`` seconds
(default 600) for enough slots after a host is lost; ``jobs/elastic/run_elastic.py`` launches
with a short timeout and turns a job that ends without every worker reporting completion into a
non-zero exit with a clear message.

What talks to Horovod Elastic (its ``ObjectState``, the retry loop) is
:mod:`dho2_tf.distributed.elastic_state`; this module imports no Horovod.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from dho2_tf.callbacks import curvature_batch_from_arrays
from dho2_tf.custom_loop import TrainingLoop
from dho2_tf.distributed.comm import Communicator, HorovodComm, default_comm
from dho2_tf.distributed.elastic_state import CommittedState, failure_summary, run_elastic
from dho2_tf.optimizer import DHO2
from dho2_tf import data_position
from dho2_tf.data_position import global_batch_rows, rank_rows  # noqa: F401 - re-exported
from dho2_tf.validation import check_int

logger = logging.getLogger(__name__)

#: DHO2 modes whose state :func:`elastic_train` can re-partition for a new world size.
ELASTIC_MODES = ("auto", "replicated", "sharded", "faithful")
PerExampleLoss = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
StepHook = Callable[[int, Communicator], None]
CommitHook = Callable[[dict[str, Any], Communicator], None]
#: Environment variable naming a file rank 0 writes (the final step) when training finished;
#: ``jobs/elastic/run_elastic.py`` sets it to tell a finished job from one that stopped early.
DONE_FILE_ENV = "DHO2_ELASTIC_DONE_FILE"
#: Keys of a commit (what ``on_commit`` receives and ``resume`` accepts).
COMMIT_KEYS = ("weights", "optimizer_state", "step", "epoch_loss", "history")


class RootRankFilter(logging.Filter):
    """Let records below WARNING through only on the process that is rank 0 *now*.

    Evaluated per record, so after a membership change the new rank 0 (which started as
    another rank) logs the recovery and the progress at the run's level, and the others stay
    quiet; warnings and errors pass on every rank.
    """

    def __init__(self, comm: Communicator) -> None:
        super().__init__()
        self.comm = comm

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: A003 - logging's name
        return record.levelno >= logging.WARNING or self.comm.is_root


def log_on_root(comm: Communicator, level: int = logging.INFO,
                fmt: str = "%(asctime)s %(name)s %(message)s") -> None:
    """Configure logging for an elastic job: ``level`` on whichever process is rank 0 (see
    :class:`RootRankFilter`), warnings and errors on every rank."""
    logging.basicConfig(level=level, format=fmt)
    root = logging.getLogger()
    root.setLevel(level)   # also when the handlers were configured before
    for handler in root.handlers:
        if not any(isinstance(f, RootRankFilter) for f in handler.filters):
            handler.addFilter(RootRankFilter(comm))


@dataclasses.dataclass(frozen=True)
class ElasticConfig:
    """Schedule of an elastic run (everything but the model, the optimizer and the data).

    Attributes:
        epochs: passes over the training set.
        global_batch: rows B per step, split over however many ranks there are (B ≥ P).
        curvature_batch: rows of the fixed curvature batch, split over the ranks like B.
        commit_every: commit every this many steps; a commit also ends every epoch.
        seed: seed of the per-epoch permutation and of the curvature rows.
    """

    epochs: int = 10
    global_batch: int = 100
    curvature_batch: int = 400
    commit_every: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "global_batch", "curvature_batch", "commit_every"):
            check_int(name, getattr(self, name), minimum=1)
        check_int("seed", self.seed, minimum=0)

    def steps_per_epoch(self, num_rows: int) -> int:
        """Full global batches in ``num_rows`` training rows (the remainder is dropped).

        Raises:
            ValueError: when there are fewer rows than one global batch.
        """
        return data_position.steps_per_epoch(num_rows, self.global_batch)

    def is_commit_step(self, step: int, steps_per_epoch: int) -> bool:
        """Whether the state is committed after ``step`` updates (same answer on every rank)."""
        return step % self.commit_every == 0 or step % steps_per_epoch == 0


@dataclasses.dataclass
class ElasticResult:
    """What :func:`elastic_train` returns (on every rank).

    Attributes:
        steps: global steps completed.
        test_accuracy: accuracy of the final weights on the test split.
        history: one dict per epoch: ``epoch``, ``loss`` (mean over its steps), ``test_accuracy``
            and ``size`` (world size at its end).
        commits: ``(step, size)`` of every commit this process made.
        starts: ``(step, size)`` of every (re-)entry into training on this process: the first
            start and one per membership change.
    """

    steps: int
    test_accuracy: float
    history: list[dict[str, float]]
    commits: list[tuple[int, int]]
    starts: list[tuple[int, int]]


class ElasticTrainer:
    """The live objects of one world size: the model, its DHO2, the custom-loop driver
    (:class:`dho2_tf.TrainingLoop`) and the traced train step.

    Args:
        model: a built Keras model with logits output; its weights are overwritten by the
            committed state at every (re)build.
        optimizer_config: DHO2 constructor arguments (or ``DHO2.get_config()``); ``mode`` must
            be one of :data:`ELASTIC_MODES`.
        data: ``(x_train, y_train, x_test, y_test)`` arrays, identical on every rank.
        config: the schedule.
        comm: the communicator (its ``rank``/``size`` are re-read after an elastic reset).
        per_example_loss: ``loss(y_true, y_pred) -> [b]``. Defaults to sparse categorical
            cross-entropy from logits.

    Raises:
        ValueError: on an invalid optimizer config or an unsupported ``mode``.
    """

    def __init__(self, model: tf.keras.Model, optimizer_config: dict[str, Any],
                 data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
                 config: ElasticConfig, comm: Communicator,
                 per_example_loss: PerExampleLoss | None = None) -> None:
        mode = optimizer_config.get("mode", "auto")
        if mode not in ELASTIC_MODES:
            raise ValueError(f"`mode` must be one of {ELASTIC_MODES} for elastic training (its "
                             f"state must be re-partitionable). Received: mode={mode!r}")
        # Validates before any collective and serialises a schedule, so rebuilds can copy it.
        self.optimizer_config = DHO2.from_config(dict(optimizer_config)).get_config()
        self.model = model
        self.x_train, self.y_train, self.x_test, self.y_test = data
        self.config, self.comm = config, comm
        self.steps_per_epoch = config.steps_per_epoch(len(self.x_train))
        # C ≤ training rows, checked before any collective (rebuild binds the rule's rows).
        data_position.curvature_rows(len(self.x_train), config.curvature_batch, config.seed)
        self.loss = per_example_loss or tf.keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="none")
        self.loop: TrainingLoop | None = None
        self._step_fn: Callable[..., tf.Tensor] | None = None

    def invalidate(self) -> None:
        """Reset callback: re-read rank and size and drop what depended on the old world."""
        if isinstance(self.comm, HorovodComm):
            self.comm.refresh()
        self.loop, self._step_fn = None, None
        if self.comm.is_root:
            logger.info("elastic reset: rank=%d size=%d", self.comm.rank, self.comm.size)

    def _scaled_loss_fn(self, rows: int) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
        """``loss_r = (P/rows)·Σ_slice ℓ``: its mean over the P ranks is the mean over ``rows``."""
        scale = self.comm.size / rows

        def loss(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
            return tf.reduce_sum(self.loss(y_true, y_pred)) * tf.cast(scale, y_pred.dtype)

        return loss

    def _slice(self, rows: np.ndarray) -> np.ndarray:
        return data_position.rank_slice(rows, self.comm.rank, self.comm.size)

    def rebuild(self, weights: list[np.ndarray], optimizer_state: dict[str, Any] | None,
                step: int) -> None:
        """Make a DHO2 for the current world size and load the committed state into it.

        Args:
            weights: committed ``model.get_weights()``.
            optimizer_state: committed ``DHO2.export_state()``, or ``None`` at step 0.
            step: committed global step (must equal the state's ``iterations``).

        Raises:
            ValueError: when a batch has fewer rows than there are ranks.
            RuntimeError: when the optimizer state and ``step`` disagree.
        """
        comm, cfg = self.comm, self.config
        if min(cfg.global_batch, cfg.curvature_batch) < comm.size:
            raise ValueError(f"`global_batch` and `curvature_batch` must be at least the world "
                             f"size {comm.size}. Received: global_batch={cfg.global_batch}, "
                             f"curvature_batch={cfg.curvature_batch}")
        self.model.set_weights(weights)
        opt = DHO2.from_config({**copy.deepcopy(self.optimizer_config), "comm": comm})
        batch = curvature_batch_from_arrays(self.x_train, self.y_train, cfg.curvature_batch,
                                            cfg.seed, comm=comm)
        # The weights are the commit every rank holds (broadcast from rank 0 by the elastic
        # state), so the loop only checks them at step 0 instead of broadcasting again.
        loop = TrainingLoop(opt, self.model, self._scaled_loss_fn(cfg.curvature_batch), batch,
                            broadcast_initial_state=False)
        loop.__enter__()   # build, rank check, bind; left in finish() (or dropped on a reset)
        if optimizer_state is not None:
            opt.import_state(optimizer_state)
        if loop.iterations != step:
            raise RuntimeError(f"Committed optimizer state is at step {loop.iterations} but "
                               f"the committed step is {step}.")
        self.loop, self._step_fn = loop, self._trace_step(opt)

    @property
    def optimizer(self) -> DHO2 | None:
        """The DHO2 of the current world size (the loop's), ``None`` before a rebuild."""
        return self.loop.optimizer if self.loop is not None else None

    def _trace_step(self, opt: DHO2) -> Callable[..., tf.Tensor]:
        model, comm = self.model, self.comm
        loss_fn = self._scaled_loss_fn(self.config.global_batch)
        spec = tf.TensorSpec([None, *self.x_train.shape[1:]], tf.as_dtype(self.x_train.dtype))
        label_spec = tf.TensorSpec([None, *self.y_train.shape[1:]],
                                   tf.as_dtype(self.y_train.dtype))

        @tf.function(input_signature=[spec, label_spec])
        def step_fn(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
            with tf.GradientTape() as tape:
                loss_r = loss_fn(y, model(x, training=True))
                if model.losses:
                    loss_r += tf.add_n(model.losses)
            variables = model.trainable_variables
            opt.apply_gradients(zip(tape.gradient(loss_r, variables), variables))
            return comm.allreduce(tf.reshape(loss_r, [1]), "mean", name="dho2/elastic/loss")[0]

        return step_fn

    def train_step(self, step: int) -> float:
        """One DHO2 update on this rank's slice of global batch ``step`` (inside the loop's
        hooks: refresh when due, the mode's hand-overs); the global mean loss."""
        if self.loop is None or self._step_fn is None:
            raise RuntimeError("ElasticTrainer.train_step() needs a built optimizer: call "
                               "rebuild(weights, optimizer_state, step) first.")
        rows = self._slice(global_batch_rows(step, len(self.x_train), self.config.global_batch,
                                             self.config.seed))
        loss = self.loop.step(self._step_fn, self.x_train[rows], self.y_train[rows])
        return float(loss.numpy())

    def end_epoch(self) -> None:
        """At an epoch boundary: log the steps skipped since the last report (as ``fit``)."""
        if self.loop is not None:
            self.loop.report_skipped()

    def finish(self) -> None:
        """When the run is done: leave the loop (the mode's end of training, the last skipped
        step report)."""
        if self.loop is not None:
            self.loop.__exit__(None, None, None)

    def snapshot(self) -> dict[str, Any]:
        """Weights and full-length optimizer state. Collective: every rank must call it."""
        if self.optimizer is None:
            raise RuntimeError("ElasticTrainer.snapshot() needs a built optimizer: call "
                               "rebuild(weights, optimizer_state, step) first.")
        state = self.optimizer.export_state()
        return {"weights": [np.array(w) for w in self.model.get_weights()],
                "optimizer_state": {k: np.array(v) for k, v in state.items()}}

    def evaluate(self) -> float:
        """Test accuracy of the current weights (local: no collective)."""
        logits = self.model(self.x_test, training=False)
        return float(np.mean(np.argmax(logits.numpy(), axis=-1) == self.y_test))


class DHO2ElasticState(CommittedState):
    """Elastic state of a DHO2 run: weights, optimizer state, step, epoch loss and history.

    The attributes are ``weights``, ``optimizer_state``, ``step`` (global steps done, i.e. the
    data position), ``epoch_loss`` and ``history`` (see :class:`ElasticResult`). ``step`` and
    ``epoch_loss`` advance as training runs; :meth:`save` (called by ``commit()``) also
    captures the weights and the full-length optimizer state from ``trainer``, so a commit is
    a collective. ``restore()`` rolls every attribute back to the last commit; ``sync()``
    broadcasts rank 0's commit.

    Args:
        trainer: the live objects to snapshot.
        comm: communicator used for the broadcasts (rank 0 is the root).
    """

    def __init__(self, trainer: ElasticTrainer, comm: Communicator) -> None:
        self.trainer = trainer
        super().__init__(comm, weights=trainer.model.get_weights(), optimizer_state=None,
                         step=0, epoch_loss=0.0, history=[])

    def save(self) -> None:
        """Capture weights and optimizer state from the trainer, then keep every attribute."""
        snapshot = self.trainer.snapshot()  # collective; attributes change only if it succeeds
        self.weights, self.optimizer_state = snapshot["weights"], snapshot["optimizer_state"]
        super().save()

    def committed(self) -> dict[str, Any]:
        """A copy of the last commit: the :data:`COMMIT_KEYS` (what ``resume`` accepts)."""
        return copy.deepcopy({key: self.saved(key) for key in COMMIT_KEYS})

    def load(self, commit: dict[str, Any]) -> None:
        """Make ``commit`` (from :meth:`committed`, e.g. read back from disk) the last commit.

        Raises:
            ValueError: when a key of :data:`COMMIT_KEYS` is missing.
        """
        missing = [key for key in COMMIT_KEYS if key not in commit]
        if missing:
            raise ValueError(f"A commit to resume from needs the keys {list(COMMIT_KEYS)}; "
                             f"missing: {missing}")
        for key in COMMIT_KEYS:
            setattr(self, key, copy.deepcopy(commit[key]))
        self.step = int(self.step)
        self.keep()  # record it without a snapshot of the (not yet built) trainer


def elastic_run_fingerprint(trainer: ElasticTrainer) -> dict[str, Any]:
    """What every rank of an elastic run must agree on: schedule, data, optimizer and model.

    :func:`dho2_tf.consistency.build_fingerprint` of the :class:`ElasticConfig` fields
    (``config.*``), the DHO2 config (``optimizer.*``), the layout facts ``training_examples``,
    ``test_examples``, ``input_shape`` and ``steps_per_epoch``, and the model's trainable
    variables (``num_trainable_variables``, ``variable[i]``: shape and dtype). The world size is
    not in it: it changes as workers come and go.
    """
    from dho2_tf.consistency import build_fingerprint

    facts = {"training_examples": len(trainer.x_train), "test_examples": len(trainer.x_test),
             "input_shape": list(trainer.x_train.shape[1:]),
             "steps_per_epoch": trainer.steps_per_epoch}
    return build_fingerprint({"config": dataclasses.asdict(trainer.config),
                              "optimizer": trainer.optimizer_config},
                             facts, trainer.model.trainable_variables)


def _train(state: DHO2ElasticState, on_step_begin: StepHook | None,
           on_commit: CommitHook | None, log: dict[str, list[tuple[int, int]]]) -> ElasticResult:
    """Train from the state's step to the end; Horovod re-enters it after every reset."""
    from dho2_tf.consistency import check_run_consistency

    trainer, cfg = state.trainer, state.trainer.config
    comm, spe = trainer.comm, trainer.steps_per_epoch
    # Every (re-)entry, so a worker that joins is checked against the ones that stayed.
    check_run_consistency(comm, elastic_run_fingerprint(trainer), "elastic run")
    trainer.rebuild(state.weights, state.optimizer_state, state.step)
    log["starts"].append((state.step, comm.size))
    if comm.is_root:
        logger.info("elastic start: step=%d epoch=%d size=%d", state.step, state.step // spe,
                    comm.size)
    total = cfg.epochs * spe
    while state.step < total:
        if on_step_begin is not None:
            on_step_begin(state.step, comm)
        state.epoch_loss += trainer.train_step(state.step)
        state.step += 1
        if state.step % spe == 0:
            record = {"epoch": state.step // spe - 1, "loss": state.epoch_loss / spe,
                      "test_accuracy": trainer.evaluate(), "size": comm.size}
            state.history = [*state.history, record]
            state.epoch_loss = 0.0
            trainer.end_epoch()
            if comm.is_root:
                logger.info("elastic epoch %(epoch)d: loss=%(loss).4f "
                            "test_accuracy=%(test_accuracy).4f size=%(size)d", record)
        if cfg.is_commit_step(state.step, spe):
            state.save()  # state.commit() in two halves, so the log shows every saved commit
            log["commits"].append((state.step, comm.size))
            if comm.is_root:
                logger.info("elastic commit: step=%d size=%d", state.step, comm.size)
            if on_commit is not None:
                on_commit(state.committed(), comm)
            state.check_host_updates()  # may raise HostsUpdatedInterrupt (kept: no roll-back)
    trainer.finish()
    done_file = os.environ.get(DONE_FILE_ENV)
    if done_file and comm.is_root:
        with open(done_file, "w", encoding="utf-8") as f:
            f.write(f"{state.step}\n")
    return ElasticResult(state.step, trainer.evaluate(), list(state.history),
                         list(log["commits"]), list(log["starts"]))


def _log_failure(state: DHO2ElasticState, error: BaseException) -> None:
    """Every survivor logs a failed collective (which rank is 0 is known only afterwards)."""
    logger.warning("elastic: a collective failed at step %d (%s: %s); rolling back to the "
                   "commit of step %d", state.step, type(error).__name__,
                   failure_summary(error), state.saved("step"))


def elastic_train(model: tf.keras.Model, optimizer_config: dict[str, Any],
                  data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
                  config: ElasticConfig, *, comm: Communicator | None = None,
                  per_example_loss: PerExampleLoss | None = None,
                  on_step_begin: StepHook | None = None, on_commit: CommitHook | None = None,
                  resume: dict[str, Any] | None = None) -> ElasticResult:
    """Train ``model`` with DHO2, surviving workers that fail or join (Horovod Elastic).

    Under ``horovodrun`` with elastic flags (``HOROVOD_ELASTIC=1``) the loop runs inside
    Horovod's elastic driver loop; under plain ``horovodrun`` or in one process it runs once,
    with the same commits, so both give the same trajectory. Rank 0's initial weights are
    broadcast to every rank at the start. See the module docstring for the semantics.

    Args:
        model: a built Keras model with logits output (build it the same way on every rank).
        optimizer_config: DHO2 constructor arguments; ``mode`` in :data:`ELASTIC_MODES`.
        data: ``(x_train, y_train, x_test, y_test)``, identical on every rank.
        config: the schedule (:class:`ElasticConfig`).
        comm: communicator. Defaults to :func:`dho2_tf.distributed.comm.default_comm` (its
            ``hvd.init`` is not a collective, so it may run before the elastic loop).
        per_example_loss: ``loss(y_true, y_pred) -> [b]``. Defaults to sparse categorical
            cross-entropy from logits.
        on_step_begin: ``hook(step, comm)`` called before every update (e.g. fault injection).
        on_commit: ``hook(commit, comm)`` called on every rank after every commit, with a copy
            of the commit (:data:`COMMIT_KEYS`), e.g. to persist it.
        resume: a commit passed to ``on_commit`` earlier: training continues from its step,
            weights and optimizer state (rank 0's is used; the trajectory is the one the
            original run would have followed from that commit at this world size).

    Returns:
        The :class:`ElasticResult` (the same on every rank, except ``commits``/``starts``,
        which are this process's own).

    Raises:
        ValueError: on an invalid configuration or an unsupported DHO2 ``mode``.
        dho2_tf.consistency.RunConsistencyError: on every rank when ranks disagree on the
            schedule, the data sizes, the optimizer config or the model's variable shapes
            (checked at every (re-)entry, before the state is used).
    """
    comm = default_comm() if comm is None else comm
    trainer = ElasticTrainer(model, optimizer_config, data, config, comm, per_example_loss)
    state = DHO2ElasticState(trainer, comm)
    state.register_reset_callbacks([trainer.invalidate])
    if resume is not None:
        state.load(resume)
    log: dict[str, list[tuple[int, int]]] = {"commits": [], "starts": []}
    if os.environ.get("HOROVOD_ELASTIC") == "1":
        return run_elastic(_train, _log_failure)(state, on_step_begin, on_commit, log)
    state.sync()
    return _train(state, on_step_begin, on_commit, log)
