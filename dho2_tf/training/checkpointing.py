"""Atomic checkpoints of a run's whole training state, re-partitioned when the world size changes.

Layout of ``directory``::

    checkpoint.json              manifest: {"format", "name", "epoch", "step", "ranks", "mode",
                                 "run"}; ``run`` is the run's configuration (optional)
    ckpt-00003-<id>/shared.npz   state every rank holds the same copy of (optimizer state)
    ckpt-00003-<id>/rank_00000.npz ... one per rank: model variables, rank-local optimizer
                                 state (ADMM), prioritized-sampler table and generator state

What is saved: the model's variables (weights, batch-norm statistics); DHO2's state in the
layout-independent form of :meth:`DHO2.export_state` (base-optimizer slots, Newton momentum,
eigenvalues, eigenvectors gathered to full length, step counter, refresh counter, ADMM duals and
consensus snapshot); a Keras baseline optimizer's variables; a bound ``PrioritizedSampler``'s
priority table, average gradient, round-robin cursor, random-generator state and the adaptive
selection's switch (τ, τ̄ and the decision; absent from older checkpoints, which resume with a
fresh switch); and the position in the data as ``epoch`` (completed epochs) and ``step``
(optimizer iterations).

Atomicity: rank 0 writes every file into a fresh temporary folder, fsyncs them, renames the
folder into place and only then replaces the manifest (write-to-temp + ``os.replace``). The
manifest is the single commit point: a writer killed at any moment leaves the previous manifest
naming the previous, complete checkpoint; older checkpoints are deleted after the commit.

Resuming with another number of ranks: the model and the sharded DHO2 state are replicated or
stored at full length, so :func:`restore_checkpoint` hands rank 0's copy to every rank and
:meth:`DHO2.import_state` cuts this rank's shard. The manifest's ``mode`` is the DHO2 layout in
use (``mode="auto"`` resolved); a ``sharded`` checkpoint resumes into ``replicated`` and back
(the same state, at full length), any other mode only into itself. ADMM iterates and sampler
tables are rank-local, so those checkpoints resume only with the world size that wrote them (a
clear error says so). Every rank reads the folder, so it must be visible to all ranks (shared
storage).

Protection: :func:`check_checkpoint_dir` rejects a directory that is a file or not writable, and
one that already holds a checkpoint unless the run resumes it or explicitly overwrites it, before
any training. :func:`config_changes` lists what differs between the run configuration a
checkpoint recorded and the resuming run. Every unreadable or corrupted file raises
:class:`CheckpointError` naming its path and what to do, on every rank.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import uuid
from typing import Any

import numpy as np
import tensorflow as tf

from dho2_tf.distributed.comm import Communicator
from dho2_tf.validation import check_int

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint directory or file cannot be used as asked (the message says what to do)."""


MANIFEST = "checkpoint.json"
FORMAT = 2
_MANIFEST_KEYS = ("format", "name", "epoch", "step", "ranks", "mode")


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint's manifest records.

    Attributes:
        name: folder of the checkpoint inside the checkpoint directory.
        epoch: completed epochs when it was written.
        step: optimizer iterations when it was written.
        ranks: number of ranks that wrote it.
        mode: DHO2 layout (the resolved mode), or ``None`` for another optimizer.
        run: the run configuration recorded with it (a flat mapping), or ``None``.
    """

    name: str
    epoch: int
    step: int
    ranks: int
    mode: str | None
    run: dict[str, Any] | None = None


def _what_to_do(directory: str) -> str:
    return (f"Restore the file from a backup, or start a new run with another checkpoint "
            f"directory or with --overwrite (which replaces the checkpoint in {directory}).")


def read_manifest(directory: str | os.PathLike[str]) -> CheckpointInfo | None:
    """The manifest of ``directory``, or None when no checkpoint was committed there yet.

    Raises:
        CheckpointError: if the manifest exists but is unreadable, of another format, or names
            a checkpoint folder that is missing (a ValueError naming the path).
    """
    directory = os.fspath(directory)
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
        missing = [key for key in _MANIFEST_KEYS if key not in manifest]
        if missing:
            raise KeyError(f"missing keys {missing}")
        run = manifest.get("run")
        if run is not None and not isinstance(run, dict):
            raise TypeError(f"'run' is a {type(run).__name__}, not a mapping")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"The checkpoint manifest {path} is unreadable or corrupted: "
                              f"{err}. {_what_to_do(directory)}") from None
    if manifest["format"] != FORMAT:
        raise CheckpointError(f"The checkpoint manifest {path} has format {manifest['format']};"
                              f" this version of dho2_tf reads format {FORMAT}.")
    if not os.path.isdir(os.path.join(directory, manifest["name"])):
        raise CheckpointError(f"The checkpoint manifest {path} names {manifest['name']!r}, "
                              f"which is not a folder in {directory}. {_what_to_do(directory)}")
    return CheckpointInfo(name=str(manifest["name"]), epoch=int(manifest["epoch"]),
                          step=int(manifest["step"]), ranks=int(manifest["ranks"]),
                          mode=manifest["mode"], run=run)


def check_checkpoint_dir(directory: str | os.PathLike[str], resume: bool = False,
                         overwrite: bool = False) -> CheckpointInfo | None:
    """Validate ``directory`` before training; return its checkpoint's manifest (or None).

    Creates the directory if it is missing and proves it writable by creating and removing a
    file in it. Every rank may call it (it is not collective; the probe's name is unique).

    Raises:
        CheckpointError: if ``directory`` is a file, cannot be created or written; if it holds
            a checkpoint and neither ``resume`` nor ``overwrite`` is set (the existing
            checkpoint is never replaced silently); if both are set; or if its manifest is
            unreadable (unless ``overwrite``).
    """
    directory = os.fspath(directory)
    if resume and overwrite:
        raise CheckpointError("Pass at most one of resume (continue the checkpoint in "
                              f"{directory}) and overwrite (replace it).")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise CheckpointError(f"The checkpoint directory {directory} is a file, not a "
                              "directory. Choose another --checkpoint-dir.")
    try:
        os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".tmp-write-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise CheckpointError(f"The checkpoint directory {directory} is not writable "
                              f"({err.strerror or err}). Fix its permissions or choose another "
                              "--checkpoint-dir.") from None
    if overwrite:
        return None
    info = read_manifest(directory)
    if info is not None and not resume:
        raise CheckpointError(
            f"The checkpoint directory {directory} already holds a checkpoint (epoch "
            f"{info.epoch}, step {info.step}, {info.ranks} rank(s)); it is not replaced "
            "silently. Pass --resume to continue it, --overwrite to replace it, or choose "
            "another --checkpoint-dir.")
    return info


def config_changes(saved: dict[str, Any], current: dict[str, Any],
                   ignore: tuple[str, ...] = ()) -> dict[str, tuple[Any, Any]]:
    """``{key: (checkpoint's value, this run's value)}`` for every key that differs.

    A key present on one side only counts as a change (its missing value is ``"<missing>"``);
    values compare by their JSON text, so tuples equal lists.
    """
    changes = {}
    for key in sorted(set(saved) | set(current)):
        if key in ignore:
            continue
        old, new = saved.get(key, "<missing>"), current.get(key, "<missing>")
        if json.dumps(old, sort_keys=True, default=repr) != json.dumps(new, sort_keys=True,
                                                                       default=repr):
            changes[key] = (old, new)
    return changes


# --------------------------------------------------------------------------- what is saved
def _dho2_mode(optimizer: Any) -> str | None:
    """The resolved DHO2 mode of a built optimizer, ``None`` for another optimizer."""
    from dho2_tf.optimizer import DHO2

    return optimizer.resolved_mode if isinstance(optimizer, DHO2) else None


def _can_resume(optimizer: Any, saved_mode: str | None) -> bool:
    """Whether a checkpoint written with ``saved_mode`` loads into the (built) ``optimizer``."""
    mode = _dho2_mode(optimizer)
    if mode is None or saved_mode is None:
        return mode is None and saved_mode is None
    return optimizer.distribution.can_import(saved_mode)


def _sampler(model: tf.keras.Model) -> Any:
    sampler = getattr(model, "sampler", None)
    return sampler if sampler is not None and getattr(sampler, "is_bound", False) else None


def _sampler_variables(sampler: Any) -> list[tf.Variable]:
    """The sampler's table variables and its generator's state, in a fixed order."""
    return [sampler.prio, sampler.prio_t, sampler.prio_a, *sampler.gbar, sampler.cursor,
            sampler.step, sampler.evaluations, sampler.rng.state]


def _switch_variables(sampler: Any) -> list[tf.Variable]:
    """The adaptive selection's switch: the last τ, its average τ̄ and the decision."""
    return [sampler.tau, sampler.tau_ema, sampler.importance_on]


def _model_variables(model: tf.keras.Model, exclude: list[tf.Variable]) -> list[tf.Variable]:
    """``model.variables`` without ``exclude`` (the sampler's), each variable once."""
    skip = {id(v) for v in exclude}
    unique: dict[int, tf.Variable] = {}
    for variable in model.variables:
        if id(variable) not in skip:
            unique.setdefault(id(variable), variable)
    return list(unique.values())


def _check_savable(optimizer: Any) -> str | None:
    mode = _dho2_mode(optimizer)
    if mode is not None and not optimizer.distribution.checkpointable:
        raise ValueError(f"Checkpoints of DHO2 mode={mode!r} are not supported: its curvature "
                         "ranks hold no training state. Use mode='sharded' for resumable runs.")
    return mode


def _rank_local_state(optimizer: Any) -> bool:
    """Whether the optimizer's state is saved per rank (DHO2 ``admm``: iterates and duals)."""
    return _dho2_mode(optimizer) is not None and optimizer.distribution.state_is_rank_local


def _optimizer_arrays(optimizer: Any) -> dict[str, np.ndarray]:
    """The optimizer's state as named arrays (collective for DHO2).

    DHO2's ``__mode__``/``__world_size__`` entries are left out: the manifest records both.
    """
    if _dho2_mode(optimizer) is not None:
        return {k: np.asarray(v) for k, v in optimizer.export_state().items()
                if not k.startswith("__")}
    return {str(i): np.asarray(v.numpy()) for i, v in enumerate(optimizer.variables)}


def _fsync_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
        handle.flush()
        os.fsync(handle.fileno())


def _write_json_atomically(path: str, payload: dict[str, Any]) -> None:
    """Replace ``path`` by ``payload`` as JSON: temporary file, fsync, ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-manifest-", suffix=".json")
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint(directory: str | os.PathLike[str], model: tf.keras.Model, optimizer: Any,
                    comm: Communicator, epoch: int = 0,
                    run_config: dict[str, Any] | None = None) -> str | None:
    """Commit the current training state to ``directory``; every rank calls it, rank 0 writes.

    Args:
        directory: checkpoint folder (created if missing).
        model: the model being trained (a ``PrioritizedModel``'s sampler is saved with it).
        optimizer: its optimizer, built (DHO2 in any mode but ``pipelined``, or a Keras one).
        comm: communicator of all ranks.
        epoch: completed epochs (where a resumed ``fit`` starts).
        run_config: the run's configuration (JSON-serialisable flat mapping), recorded in the
            manifest so that a resume can refuse incompatible changes.

    Returns:
        The new checkpoint's folder name on rank 0, None on the other ranks.

    Raises:
        ValueError: for a pipelined DHO2 or a negative ``epoch`` (before any collective).
    """
    epoch = check_int("epoch", epoch, minimum=0)
    mode = _check_savable(optimizer)
    sampler = _sampler(model)
    sampler_vars = _sampler_variables(sampler) if sampler is not None else []
    opt_arrays = _optimizer_arrays(optimizer)
    local = {f"model/{i}": np.asarray(v.numpy())
             for i, v in enumerate(_model_variables(model, sampler_vars))}
    local.update({f"sampler/{i}": np.asarray(v.numpy()) for i, v in enumerate(sampler_vars)})
    if sampler is not None:
        local.update({f"sampler_switch/{i}": np.asarray(v.numpy())
                      for i, v in enumerate(_switch_variables(sampler))})
    rank_local = _rank_local_state(optimizer)
    if rank_local:  # e.g. consensus ADMM's iterates and duals
        local.update({f"optimizer/{k}": v for k, v in opt_arrays.items()})
    per_rank = comm.allgather_object(local, name="dho2/checkpoint/state")
    if not comm.is_root:
        return None
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    step = int(optimizer.iterations.numpy())
    name = f"ckpt-{epoch:05d}-{step:08d}-{uuid.uuid4().hex[:8]}"
    tmp_dir = tempfile.mkdtemp(dir=directory, prefix=".tmp-ckpt-")
    try:
        shared = {} if rank_local else {f"optimizer/{k}": v for k, v in opt_arrays.items()}
        _fsync_npz(os.path.join(tmp_dir, "shared.npz"), shared)
        for j, arrays in enumerate(per_rank):
            _fsync_npz(os.path.join(tmp_dir, f"rank_{j:05d}.npz"), arrays)
        os.replace(tmp_dir, os.path.join(directory, name))
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    _write_json_atomically(os.path.join(directory, MANIFEST),  # the commit point
                           {"format": FORMAT, "name": name, "epoch": epoch, "step": step,
                            "ranks": comm.size, "mode": mode,
                            **({"run": dict(run_config)} if run_config is not None else {})})
    for entry in os.listdir(directory):  # older checkpoints and leftovers of dead writes
        if entry != name and entry.startswith(("ckpt-", ".tmp-ckpt-")):
            shutil.rmtree(os.path.join(directory, entry), ignore_errors=True)
    logger.info("Saved checkpoint %s (epoch %d, step %d)", os.path.join(directory, name),
                epoch, step)
    return name


# --------------------------------------------------------------------------- restore
def _load_npz(path: str) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` at ``path``.

    Raises:
        CheckpointError: naming ``path`` and what to do when the file is missing, truncated or
            corrupted (``BadZipFile``, ``EOFError``, ``zlib.error``, bad headers, ...).
    """
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except Exception as err:  # noqa: BLE001 - any decoding failure of a corrupted file
        directory = os.path.dirname(os.path.dirname(path))
        raise CheckpointError(f"Checkpoint file {path} is unreadable or corrupted "
                              f"({type(err).__name__}: {err}). {_what_to_do(directory)}") from None


def _assign_all(kind: str, variables: list[tf.Variable], arrays: dict[str, np.ndarray],
                source: str) -> None:
    """Assign ``arrays[f"{kind}/{i}"]`` to ``variables[i]`` after checking count and shapes."""
    stored = sorted((k for k in arrays if k.startswith(kind + "/")),
                    key=lambda k: int(k.split("/", 1)[1]))
    if len(stored) != len(variables):
        raise ValueError(f"The checkpoint {source} holds {len(stored)} {kind} variables; this "
                         f"run has {len(variables)}. Was it written for another model?")
    for key, variable in zip(stored, variables):
        value = arrays[key]
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(f"The checkpoint {source} has shape {value.shape} for {kind} "
                             f"variable {variable.name!r}; this run has {tuple(variable.shape)}.")
    for key, variable in zip(stored, variables):
        variable.assign(arrays[key])


def _refuse_rank_local(directory: Any, saved_ranks: int, ranks: int, what: str) -> None:
    raise ValueError(f"The checkpoint in {directory} was written by {saved_ranks} rank(s) and "
                     f"holds rank-local {what}; resume it with {saved_ranks} rank(s), not "
                     f"{ranks}.")


def restore_checkpoint(directory: str | os.PathLike[str], model: tf.keras.Model,
                       optimizer: Any, comm: Communicator) -> CheckpointInfo:
    """Load the checkpoint the manifest of ``directory`` names into this rank's objects.

    Every rank calls it with the model and the optimizer built as in the run that wrote it
    (the optimizer is built here if needed). With another world size, the replicated state comes
    from rank 0's copy and DHO2 re-shards it (``import_state``).

    Returns:
        The checkpoint's :class:`CheckpointInfo` (``epoch`` and ``step`` to continue from).

    Raises:
        FileNotFoundError: if ``directory`` has no committed checkpoint.
        CheckpointError: on every rank when any rank's file is unreadable or corrupted (the
            message names each path).
        ValueError: on a checkpoint of another model, optimizer or mode, or rank-local state
            (ADMM, prioritized sampler) written by another number of ranks.
    """
    info = read_manifest(directory)
    if info is None:
        raise FileNotFoundError(f"No checkpoint manifest ({MANIFEST}) in {directory}.")
    optimizer.build(model.trainable_variables)   # resolves DHO2's mode="auto"
    mode = _check_savable(optimizer)
    if not _can_resume(optimizer, info.mode):
        raise ValueError(f"The checkpoint in {directory} was written with DHO2 mode "
                         f"{info.mode!r}; this run's optimizer has mode {mode!r}.")
    folder = os.path.join(os.fspath(directory), info.name)
    same_world = info.ranks == comm.size
    rank_local = _rank_local_state(optimizer)
    if not same_world and rank_local:
        _refuse_rank_local(directory, info.ranks, comm.size, "ADMM iterates")
    source = os.path.join(folder, f"rank_{comm.rank if same_world else 0:05d}.npz")
    shared_source = os.path.join(folder, "shared.npz")
    local, shared, problem = {}, {}, ""
    try:
        local = _load_npz(source)
        if not rank_local:
            shared = _load_npz(shared_source)
    except CheckpointError as err:
        problem = str(err)
    # Every rank learns about any rank's unreadable file, so all of them stop here together.
    problems = [p for p in comm.allgather_object(problem, name="dho2/checkpoint/read") if p]
    if problems:
        raise CheckpointError("\n".join(dict.fromkeys(problems)))
    sampler = _sampler(model)
    saved_sampler = any(key.startswith("sampler/") for key in local)
    if saved_sampler != (sampler is not None):
        raise ValueError(f"The checkpoint in {directory} {'has' if saved_sampler else 'lacks'} "
                         "a prioritized-sampler table; this run "
                         f"{'lacks' if sampler is None else 'has'} one.")
    if not same_world and saved_sampler:
        _refuse_rank_local(directory, info.ranks, comm.size, "prioritized-sampler tables")
    sampler_vars = _sampler_variables(sampler) if sampler is not None else []
    _assign_all("model", _model_variables(model, sampler_vars), local, source)
    _assign_all("sampler", sampler_vars, local, source)
    if sampler is not None and "sampler_switch/0" in local:
        _assign_all("sampler_switch", _switch_variables(sampler), local, source)
    arrays = local  # rank-local optimizer state (ADMM); the others' is in shared.npz
    if not rank_local:
        source, arrays = shared_source, shared
    if mode is None:
        _assign_all("optimizer", list(optimizer.variables), arrays, source)
    else:
        optimizer.import_state({**{k.split("/", 1)[1]: v for k, v in arrays.items()
                                   if k.startswith("optimizer/")},
                                "__mode__": info.mode, "__world_size__": info.ranks})
        optimizer.sync_host_state()   # the model's statistics changed outside a step
    if comm.is_root:
        logger.info("Resumed from %s (epoch %d, step %d, written by %d rank(s))", folder,
                    info.epoch, info.step, info.ranks)
    return info


class EpochCheckpoint(tf.keras.callbacks.Callback):
    """Commit a checkpoint at the end of every epoch; optionally restore when training starts.

    Put it after the callbacks that broadcast the initial state (``CurvatureRefresh``,
    ``BroadcastInitialState``) and after the ones that synchronise the replicas at the epoch end,
    so the restored state is not overwritten and the saved one is the evaluated one. Pass
    ``initial_epoch=restored epoch`` to ``fit`` (see :func:`read_manifest`).

    Args:
        directory: checkpoint folder.
        comm: communicator.
        resume: restore the checkpoint named by the manifest in ``on_train_begin``.
        overwrite: allow replacing a checkpoint already in ``directory`` without resuming it;
            otherwise ``on_train_begin`` refuses (:func:`check_checkpoint_dir`).
        run_config: the run's configuration, recorded in every manifest.
    """

    def __init__(self, directory: str | os.PathLike[str], comm: Communicator,
                 resume: bool = False, overwrite: bool = False,
                 run_config: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.directory = os.fspath(directory)
        self.comm = comm
        self.resume = resume
        self.overwrite = overwrite
        self.run_config = run_config
        self.restored: CheckpointInfo | None = None

    def on_train_begin(self, logs: dict | None = None) -> None:
        check_checkpoint_dir(self.directory, resume=self.resume, overwrite=self.overwrite)
        if self.resume:
            self.restored = restore_checkpoint(self.directory, self.model, self.model.optimizer,
                                               self.comm)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        save_checkpoint(self.directory, self.model, self.model.optimizer, self.comm,
                        epoch=epoch + 1, run_config=self.run_config)
