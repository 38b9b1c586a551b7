"""Atomic checkpoints of a run's whole training state, re-partitioned when the world size changes.

Layout of ``directory``::

    checkpoint.json              manifest: the newest checkpoint's {"name", "epoch", "step",
                                 "ranks", "mode", "good", "run"} and "checkpoints", the list of
                                 every checkpoint folder the directory owns (oldest first)
    checkpoint.lock              {"host", "pid"} of the run writing here (checkpoint_lock)
    checkpoint.pending           folders a save is creating, until its manifest commits
    ckpt-00003-<id>/shared.npz   state every rank holds the same copy of (optimizer state)
    ckpt-00003-<id>/rank_00000.npz ... one per rank: model variables, rank-local optimizer
                                 state (ADMM), prioritized-sampler table and generator state
    ckpt-00003-<id>/info.json    the checkpoint's manifest entry (``--recover-from`` reads it)

What is saved: the model's variables (weights, batch-norm statistics); DHO2's state in the
layout-independent form of :meth:`DHO2.export_state` (base-optimizer slots, Newton momentum,
eigenvalues, eigenvectors gathered to full length, step counter, refresh counter, ADMM duals and
consensus snapshot); a Keras baseline optimizer's variables; a bound ``PrioritizedSampler``'s
priority table, average gradient, round-robin cursor, random-generator state and the adaptive
selection's switch (τ, τ̄ and the decision; absent from older checkpoints, which resume with a
fresh switch); and the position in the data as ``epoch`` (completed epochs) and ``step``
(optimizer iterations).

Atomicity: rank 0 records the folders it is about to create in ``checkpoint.pending``, writes
every file into a fresh temporary folder, fsyncs them, renames the folder into place and only
then replaces the manifest (write-to-temp + ``os.replace``). The manifest is the single commit
point: a writer killed at any moment leaves the previous manifest naming the previous, complete
checkpoints. A save that fails (a full disk) removes its folders before raising on every rank;
one killed outright leaves them in ``checkpoint.pending``, and the next start removes them.

Retention (as TensorFlow's ``CheckpointManager``): the manifest keeps the newest ``keep``
checkpoints and, in addition, the newest *good* one. A checkpoint is bad when its epoch's loss
is not finite or more than ``max_skipped_fraction`` of its steps were skipped (non-finite
updates); it is written and marked ``"good": false``, never displaces the last good one, and a
resume continues the last good checkpoint unless another is named (``resume_from``).

Ownership: only folders the manifest lists are ever deleted. A ``ckpt-*`` folder the manifest
does not list (a user's folder, or a checkpoint whose manifest was lost) makes the run refuse,
naming it; :func:`recover_checkpoint` rebuilds the manifest from a complete folder.

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
:class:`CheckpointError` naming its path and what to do, on every rank. docs/reliability.md
states these rules with their messages.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import tempfile
import uuid
from typing import Any

import numpy as np
import tensorflow as tf

from dho2_tf.distributed.comm import Communicator
from dho2_tf.training.atomic_write import write_text_atomically
from dho2_tf.training.checkpoint_lock import CheckpointError, acquire_lock, release_lock
from dho2_tf.validation import check_int, check_real

logger = logging.getLogger(__name__)


MANIFEST = "checkpoint.json"
PENDING = "checkpoint.pending"
INFO = "info.json"
FORMAT = 3
READABLE_FORMATS = (2, 3)   # format 2: one checkpoint, no retention list (always good)
_MANIFEST_KEYS = ("format", "name", "epoch", "step", "ranks", "mode")
_FOLDER = re.compile(r"ckpt-.*")


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint's manifest entry records.

    Attributes:
        name: folder of the checkpoint inside the checkpoint directory.
        epoch: completed epochs when it was written.
        step: optimizer iterations when it was written.
        ranks: number of ranks that wrote it.
        mode: DHO2 layout (the resolved mode), or ``None`` for another optimizer.
        run: the run configuration recorded with it (a flat mapping), or ``None``.
        good: False when its epoch's loss was not finite or too many steps were skipped.
    """

    name: str
    epoch: int
    step: int
    ranks: int
    mode: str | None
    run: dict[str, Any] | None = None
    good: bool = True

    def identity(self) -> dict[str, Any]:
        """What ranks compare before resuming: name, epoch, step and the run's fingerprint
        digest (:func:`run_digest`)."""
        return {"name": self.name, "epoch": self.epoch, "step": self.step,
                "run": run_digest(self.run)}

    def entry(self) -> dict[str, Any]:
        """The manifest entry (JSON)."""
        out = dataclasses.asdict(self)
        if out["run"] is None:
            del out["run"]
        return out


def run_digest(run: dict[str, Any] | None) -> str | None:
    """First 12 hex digits of the SHA-256 of ``run``'s canonical JSON (None without one)."""
    import hashlib

    if run is None:
        return None
    return hashlib.sha256(json.dumps(run, sort_keys=True, default=repr).encode()).hexdigest()[:12]


def _what_to_do(directory: str) -> str:
    return (f"Restore the file from a backup, or start a new run with another checkpoint "
            f"directory or with --overwrite (which replaces the checkpoint in {directory}).")


def _parse_entry(raw: Any) -> CheckpointInfo:
    """A manifest entry, type-checked (ValueError naming the bad field)."""
    if not isinstance(raw, dict):
        raise ValueError(f"an entry is a {type(raw).__name__}, not a mapping")
    missing = [key for key in _MANIFEST_KEYS[1:] if key not in raw]
    if missing:
        raise ValueError(f"missing keys {missing}")
    for key, minimum in (("epoch", 0), ("step", 0), ("ranks", 1)):
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{key!r} must be an integer >= {minimum}, not {value!r}")
    if not isinstance(raw["name"], str) or not _FOLDER.fullmatch(raw["name"]) \
            or os.sep in raw["name"]:
        raise ValueError(f"'name' must be a ckpt-* folder name, not {raw['name']!r}")
    if raw["mode"] is not None and not isinstance(raw["mode"], str):
        raise ValueError(f"'mode' must be a string or null, not {raw['mode']!r}")
    run, good = raw.get("run"), raw.get("good", True)
    if run is not None and not isinstance(run, dict):
        raise ValueError(f"'run' is a {type(run).__name__}, not a mapping")
    if not isinstance(good, bool):
        raise ValueError(f"'good' must be true or false, not {good!r}")
    return CheckpointInfo(name=raw["name"], epoch=raw["epoch"], step=raw["step"],
                          ranks=raw["ranks"], mode=raw["mode"], run=run, good=good)


def read_checkpoints(directory: str | os.PathLike[str]) -> list[CheckpointInfo]:
    """Every checkpoint the manifest of ``directory`` owns, oldest first ([] without one).

    Raises:
        CheckpointError: if the manifest exists but is unreadable, of another format, has a
            field of the wrong type (``"epoch": "two"``), or names a checkpoint folder that is
            missing (one line naming the path and what to do).
    """
    directory = os.fspath(directory)
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return []
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
        if not isinstance(manifest, dict):
            raise ValueError(f"it holds a {type(manifest).__name__}, not a mapping")
        if "format" not in manifest:
            raise ValueError("missing key 'format'")
        if manifest["format"] not in READABLE_FORMATS:
            raise CheckpointError(f"The checkpoint manifest {path} has format "
                                  f"{manifest['format']!r}; this version of dho2_tf reads "
                                  f"formats {list(READABLE_FORMATS)}.")
        raw = manifest.get("checkpoints", [manifest]) if manifest["format"] == 3 else [manifest]
        if not isinstance(raw, list) or not raw:
            raise ValueError("'checkpoints' must be a non-empty list")
        checkpoints = [_parse_entry(entry) for entry in raw]
        if "checkpoints" in manifest:   # the newest entry's copy at the top level, checked too
            _parse_entry({k: v for k, v in manifest.items() if k != "checkpoints"})
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"The checkpoint manifest {path} is unreadable or corrupted: "
                              f"{err}. {_what_to_do(directory)}") from None
    for info in checkpoints:
        if not os.path.isdir(os.path.join(directory, info.name)):
            raise CheckpointError(f"The checkpoint manifest {path} names {info.name!r}, "
                                  f"which is not a folder in {directory}. {_what_to_do(directory)}")
    return checkpoints


def read_manifest(directory: str | os.PathLike[str]) -> CheckpointInfo | None:
    """The newest checkpoint of ``directory``'s manifest, or None when none was committed.

    Raises:
        CheckpointError: as :func:`read_checkpoints`.
    """
    checkpoints = read_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None


def resume_target(checkpoints: list[CheckpointInfo], directory: str,
                  name: str | None = None) -> CheckpointInfo | None:
    """The checkpoint a resume continues: the one called ``name``, else the newest good one.

    Returns None when ``checkpoints`` is empty.

    Raises:
        CheckpointError: when ``name`` is not owned by the manifest, or no checkpoint is good
            and none is named.
    """
    if not checkpoints:
        return None
    listing = ", ".join(f"{c.name} (epoch {c.epoch}, {'good' if c.good else 'bad'})"
                        for c in checkpoints)
    if name is not None:
        for info in checkpoints:
            if info.name == name:
                return info
        raise CheckpointError(f"`resume_from` names {name!r}, which the manifest of "
                              f"{directory} does not list. Its checkpoints: {listing}.")
    good = [c for c in checkpoints if c.good]
    if not good:
        raise CheckpointError(f"No good checkpoint in {directory} (every one had a non-finite "
                              f"loss or too many skipped steps): {listing}. Name one with "
                              "--resume-from NAME to resume it anyway.")
    return good[-1]


def retained(checkpoints: list[CheckpointInfo], keep: int) -> list[CheckpointInfo]:
    """The newest ``keep`` of ``checkpoints`` plus the newest good one, in their order."""
    good = [c for c in checkpoints if c.good]
    kept = {c.name for c in checkpoints[-keep:]} | ({good[-1].name} if good else set())
    return [c for c in checkpoints if c.name in kept]


def _read_pending(directory: str) -> list[str]:
    try:
        with open(os.path.join(directory, PENDING), encoding="utf-8") as handle:
            folders = json.load(handle).get("folders", [])
        return [f for f in folders if isinstance(f, str) and "/" not in f and f not in ("", ".", "..")]
    except (OSError, ValueError, AttributeError):
        return []


def clean_pending(directory: str, owned: set[str]) -> list[str]:
    """Remove the folders ``checkpoint.pending`` records that the manifest does not own, then
    the marker; the removed names. A save records the folders it creates and the owned ones it
    retires, so these are the leftovers of a save that died before (or just after) its
    commit."""
    removed = [f for f in _read_pending(directory) if f not in owned]
    for folder in removed:
        shutil.rmtree(os.path.join(directory, folder), ignore_errors=True)
    try:
        os.remove(os.path.join(directory, PENDING))
    except FileNotFoundError:
        pass
    return [f for f in removed if not f.startswith(".")]


def unknown_folders(directory: str, checkpoints: list[CheckpointInfo]) -> list[str]:
    """``ckpt-*`` folders in ``directory`` that neither the manifest nor the pending marker
    lists (the directory does not own them: they are never deleted, and the run refuses)."""
    owned = {c.name for c in checkpoints} | set(_read_pending(directory))
    return sorted(entry for entry in os.listdir(directory)
                  if _FOLDER.fullmatch(entry) and entry not in owned
                  and os.path.isdir(os.path.join(directory, entry)))


def _refuse_unknown(directory: str, unknown: list[str]) -> None:
    raise CheckpointError(
        f"The checkpoint directory {directory} holds checkpoint folder(s) its manifest "
        f"({MANIFEST}) does not list: {', '.join(unknown)}. Only listed folders are ever "
        f"deleted, so the run refuses to share the directory with them. Move them out of "
        f"{directory}, or adopt a complete one with: python jobs/train.py --checkpoint-dir "
        f"{directory} --recover-from FOLDER (rebuilds {MANIFEST}).")


def check_checkpoint_dir(directory: str | os.PathLike[str], resume: bool = False,
                         overwrite: bool = False,
                         resume_from: str | None = None) -> CheckpointInfo | None:
    """Validate ``directory`` before training; return the checkpoint to resume (or None).

    Creates the directory if it is missing and proves it writable by creating and removing a
    file in it. Every rank may call it (it is not collective; the probe's name is unique).

    Returns:
        With ``resume``, the checkpoint a resume continues (:func:`resume_target`); without,
        None.

    Raises:
        CheckpointError: if ``directory`` is a file, cannot be created or written; if it holds
            ``ckpt-*`` folders its manifest does not list (or a checkpoint without a
            manifest); if it holds a checkpoint and neither ``resume`` nor ``overwrite`` is set
            (the existing checkpoint is never replaced silently); if both are set; or if its
            manifest is unreadable (unless ``overwrite``).
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
    try:
        checkpoints = read_checkpoints(directory)
    except CheckpointError:
        if not overwrite:
            raise
        checkpoints = []
    unknown = unknown_folders(directory, checkpoints)
    if unknown:
        _refuse_unknown(directory, unknown)
    if overwrite:
        return None
    if checkpoints and not resume:
        info = checkpoints[-1]
        raise CheckpointError(
            f"The checkpoint directory {directory} already holds a checkpoint (epoch "
            f"{info.epoch}, step {info.step}, {info.ranks} rank(s)); it is not replaced "
            "silently. Pass --resume to continue it, --overwrite to replace it, or choose "
            "another --checkpoint-dir.")
    return resume_target(checkpoints, directory, resume_from) if resume else None


def recover_checkpoint(directory: str | os.PathLike[str], folder: str) -> CheckpointInfo:
    """Adopt the complete checkpoint ``folder`` of ``directory`` into its manifest.

    A checkpoint whose manifest was lost, or a folder copied in by hand, is listed again (as
    the newest, good checkpoint) so that ``--resume`` continues it. The folder must hold its
    ``info.json`` and every file it names, each readable.

    Raises:
        CheckpointError: when ``folder`` is not a complete, readable checkpoint folder.
    """
    directory = os.fspath(directory)
    name = os.path.basename(os.path.normpath(folder))
    path = os.path.join(directory, name)
    try:
        with open(os.path.join(path, INFO), encoding="utf-8") as handle:
            info = _parse_entry(json.load(handle))
        if info.name != name:
            raise ValueError(f"it records the name {info.name!r}")
    except (OSError, ValueError) as err:
        raise CheckpointError(f"Cannot recover {path}: it is not a complete checkpoint folder "
                              f"of {directory} ({INFO}: {err}).") from None
    files = ["shared.npz"] + [f"rank_{j:05d}.npz" for j in range(info.ranks)]
    for file in files:
        _load_npz(os.path.join(path, file))
    try:
        checkpoints = [c for c in read_checkpoints(directory) if c.name != name]
    except CheckpointError:   # a lost or corrupted manifest is what this rebuilds
        checkpoints = []
    _write_manifest(directory, [*checkpoints, dataclasses.replace(info, good=True)])
    clean_pending(directory, {c.name for c in checkpoints} | {name})
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
    """Replace ``path`` by ``payload`` as JSON (:func:`write_text_atomically`, mode 0644)."""
    write_text_atomically(path, json.dumps(payload, indent=1), mode=0o644)


def _write_manifest(directory: str, checkpoints: list[CheckpointInfo]) -> None:
    """Commit ``checkpoints`` (oldest first) as the manifest: the newest one's fields at the
    top level (what format-2 readers read) and the whole list under ``checkpoints``."""
    newest = checkpoints[-1].entry()
    _write_json_atomically(os.path.join(directory, MANIFEST),
                           {"format": FORMAT, **newest,
                            "checkpoints": [c.entry() for c in checkpoints]})


def _owned_before(directory: str, fresh: bool) -> list[CheckpointInfo]:
    """The checkpoints the manifest owns now ([] when it is missing or unreadable)."""
    try:
        return read_checkpoints(directory)
    except CheckpointError:
        if fresh:   # an --overwrite of an unreadable manifest: nothing is known to be owned
            return []
        raise


def save_checkpoint(directory: str | os.PathLike[str], model: tf.keras.Model, optimizer: Any,
                    comm: Communicator, epoch: int = 0,
                    run_config: dict[str, Any] | None = None, *, keep: int = 2,
                    good: bool = True, fresh: bool = False) -> str | None:
    """Commit the current training state to ``directory``; every rank calls it, rank 0 writes.

    Args:
        directory: checkpoint folder (created if missing).
        model: the model being trained (a ``PrioritizedModel``'s sampler is saved with it).
        optimizer: its optimizer, built (DHO2 in any mode but ``pipelined``, or a Keras one).
        comm: communicator of all ranks.
        epoch: completed epochs (where a resumed ``fit`` starts).
        run_config: the run's configuration (JSON-serialisable flat mapping), recorded in the
            manifest so that a resume can refuse incompatible changes.
        keep: how many of the newest checkpoints to keep (the newest good one is kept too).
        good: False marks the checkpoint bad (diverged epoch): it never displaces the last
            good one and a resume skips it.
        fresh: start a new list (``overwrite``): the checkpoints the manifest owned so far are
            deleted once this one is committed.

    Returns:
        The new checkpoint's folder name on rank 0, None on the other ranks.

    Raises:
        ValueError: for a pipelined DHO2, a negative ``epoch`` or ``keep`` < 1 (before any
            collective).
        CheckpointError: on every rank when rank 0 could not write it (a full disk): its
            partial folder is removed and the previous checkpoints are untouched.
    """
    epoch = check_int("epoch", epoch, minimum=0)
    keep = check_int("keep", keep, minimum=1)
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
    name, problem = None, ""
    if comm.is_root:
        shared = {} if rank_local else {f"optimizer/{k}": v for k, v in opt_arrays.items()}
        info = CheckpointInfo(
            name=f"ckpt-{epoch:05d}-{int(optimizer.iterations.numpy()):08d}-"
                 f"{uuid.uuid4().hex[:8]}", epoch=epoch,
            step=int(optimizer.iterations.numpy()), ranks=comm.size, mode=mode,
            run=None if run_config is None else dict(run_config), good=good)
        try:
            _commit(os.fspath(directory), info, shared, per_rank, keep, fresh)
            name = info.name
        except OSError as err:
            problem = (f"Could not write checkpoint {os.path.join(os.fspath(directory), info.name)}"
                       f" ({err.strerror or err}); its partial folder was removed and the "
                       "previous checkpoints are intact. Free space (or fix the storage) and "
                       "resume with --resume.")
    problem = next((p for p in comm.allgather_object(problem, name="dho2/checkpoint/commit")
                    if p), "")
    if problem:
        raise CheckpointError(problem)
    return name


def _commit(directory: str, info: CheckpointInfo, shared: dict[str, np.ndarray],
            per_rank: list[dict[str, np.ndarray]], keep: int, fresh: bool) -> None:
    """Rank 0's write of :func:`save_checkpoint`: pending marker, folder, manifest, retention.

    Math: kept = newest ``keep`` of (previous + [info]) ∪ {newest good}; deleted = owned − kept.
    """
    os.makedirs(directory, exist_ok=True)
    before = _owned_before(directory, fresh)
    owned = {c.name for c in before}
    clean_pending(directory, owned)   # leftovers of a killed save
    checkpoints = retained(([] if fresh else before) + [info], keep)
    kept = {c.name for c in checkpoints}
    retired = [c.name for c in before if c.name not in kept]
    tmp_name = f".tmp-{info.name}"
    # What this save creates, and what it retires: whichever of them the manifest does not own
    # when the next run starts (this save died) is removed then.
    _write_json_atomically(os.path.join(directory, PENDING),
                           {"folders": [tmp_name, info.name, *retired]})
    tmp_dir = os.path.join(directory, tmp_name)
    try:
        os.mkdir(tmp_dir)
        _fsync_npz(os.path.join(tmp_dir, "shared.npz"), shared)
        for j, arrays in enumerate(per_rank):
            _fsync_npz(os.path.join(tmp_dir, f"rank_{j:05d}.npz"), arrays)
        _write_json_atomically(os.path.join(tmp_dir, INFO), info.entry())
        os.replace(tmp_dir, os.path.join(directory, info.name))
        _write_manifest(directory, checkpoints)  # the commit point
    except BaseException:
        clean_pending(directory, owned)   # this save's folders; the retired ones stay owned
        raise
    clean_pending(directory, kept)   # the retired folders: only ones the manifest owned
    if not info.good:
        last_good = next((c.name for c in reversed(checkpoints) if c.good), None)
        logger.warning("Checkpoint %s (epoch %d, step %d) is marked bad; the last good one (%s) "
                       "is kept and --resume continues it.", os.path.join(directory, info.name),
                       info.epoch, info.step, last_good or "none")
    logger.info("Saved checkpoint %s (epoch %d, step %d)", os.path.join(directory, info.name),
                info.epoch, info.step)


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


def _check_all(kind: str, variables: list[tf.Variable], arrays: dict[str, np.ndarray],
               source: str) -> list[str]:
    """The keys ``f"{kind}/{i}"`` of ``arrays`` in order, after checking count and shapes.

    Raises:
        CheckpointError: naming ``source`` on another count or shape (another model).
    """
    stored = sorted((k for k in arrays if k.startswith(kind + "/")),
                    key=lambda k: int(k.split("/", 1)[1]))
    if len(stored) != len(variables):
        raise CheckpointError(f"The checkpoint {source} holds {len(stored)} {kind} variables; "
                              f"this run has {len(variables)}. Was it written for another "
                              "model?")
    for key, variable in zip(stored, variables):
        value = arrays[key]
        if tuple(value.shape) != tuple(variable.shape):
            raise CheckpointError(f"The checkpoint {source} has shape {value.shape} for {kind} "
                                  f"variable {variable.name!r}; this run has "
                                  f"{tuple(variable.shape)}.")
    return stored


def _assign_all(kind: str, variables: list[tf.Variable], arrays: dict[str, np.ndarray],
                source: str) -> None:
    """Assign ``arrays[f"{kind}/{i}"]`` to ``variables[i]`` after checking count and shapes."""
    for key, variable in zip(_check_all(kind, variables, arrays, source), variables):
        variable.assign(arrays[key])


def _refuse_rank_local(directory: Any, saved_ranks: int, ranks: int, what: str) -> None:
    raise ValueError(f"The checkpoint in {directory} was written by {saved_ranks} rank(s) and "
                     f"holds rank-local {what}; resume it with {saved_ranks} rank(s), not "
                     f"{ranks}.")


def _read_rank_files(directory: str, info: CheckpointInfo, model: tf.keras.Model,
                     optimizer: Any, comm: Communicator) -> tuple[dict, dict, str, str]:
    """This rank's ``(local arrays, shared arrays, local path, shared path)``, every array's
    count and shape checked against ``model`` (CheckpointError naming the file otherwise)."""
    folder = os.path.join(directory, info.name)
    same_world = info.ranks == comm.size
    rank_local = _rank_local_state(optimizer)
    source = os.path.join(folder, f"rank_{comm.rank if same_world else 0:05d}.npz")
    shared_source = os.path.join(folder, "shared.npz")
    local = _load_npz(source)
    shared = {} if rank_local else _load_npz(shared_source)
    sampler = _sampler(model)
    sampler_vars = _sampler_variables(sampler) if sampler is not None else []
    _check_all("model", _model_variables(model, sampler_vars), local, source)
    if sampler is not None and any(key.startswith("sampler/") for key in local):
        _check_all("sampler", sampler_vars, local, source)
    if _dho2_mode(optimizer) is None:
        _check_all("optimizer", list(optimizer.variables), shared if not rank_local else local,
                   shared_source if not rank_local else source)
    return local, shared, source, shared_source


def restore_checkpoint(directory: str | os.PathLike[str], model: tf.keras.Model,
                       optimizer: Any, comm: Communicator,
                       info: CheckpointInfo | None = None) -> CheckpointInfo:
    """Load a checkpoint of ``directory`` into this rank's objects.

    Every rank calls it with the model and the optimizer built as in the run that wrote it
    (the optimizer is built here if needed). With another world size, the replicated state comes
    from rank 0's copy and DHO2 re-shards it (``import_state``).

    Args:
        info: which checkpoint (an entry of :func:`read_checkpoints`); default: the newest
            good one (:func:`resume_target`).

    Returns:
        The checkpoint's :class:`CheckpointInfo` (``epoch`` and ``step`` to continue from).

    Raises:
        FileNotFoundError: if ``directory`` has no committed checkpoint.
        CheckpointError: on every rank when any rank's file is unreadable, corrupted or of
            another shape (the message names each path with its rank).
        ValueError: on a checkpoint of another optimizer or mode, or rank-local state
            (ADMM, prioritized sampler) written by another number of ranks.
    """
    directory = os.fspath(directory)
    if info is None:
        info = resume_target(read_checkpoints(directory), directory)
    if info is None:
        raise FileNotFoundError(f"No checkpoint manifest ({MANIFEST}) in {directory}.")
    optimizer.build(model.trainable_variables)   # resolves DHO2's mode="auto"
    mode = _check_savable(optimizer)
    if not _can_resume(optimizer, info.mode):
        raise ValueError(f"The checkpoint in {directory} was written with DHO2 mode "
                         f"{info.mode!r}; this run's optimizer has mode {mode!r}.")
    rank_local = _rank_local_state(optimizer)
    if info.ranks != comm.size and rank_local:
        _refuse_rank_local(directory, info.ranks, comm.size, "ADMM iterates")
    problem = ""
    try:
        local, shared, source, shared_source = _read_rank_files(directory, info, model,
                                                                optimizer, comm)
    except CheckpointError as err:
        problem = str(err)
    # Every rank learns about any rank's bad file, so all of them stop here together.
    everyone = comm.allgather_object(problem, name="dho2/checkpoint/read")
    if any(everyone):
        by_text: dict[str, list[int]] = {}
        for rank, text in enumerate(everyone):
            if text:
                by_text.setdefault(text, []).append(rank)
        raise CheckpointError("\n".join(
            text if comm.size == 1 else f"rank {','.join(map(str, ranks))}: {text}"
            for text, ranks in by_text.items()))
    sampler = _sampler(model)
    saved_sampler = any(key.startswith("sampler/") for key in local)
    if saved_sampler != (sampler is not None):
        raise ValueError(f"The checkpoint in {directory} {'has' if saved_sampler else 'lacks'} "
                         "a prioritized-sampler table; this run "
                         f"{'lacks' if sampler is None else 'has'} one.")
    if info.ranks != comm.size and saved_sampler:
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
        logger.info("Resumed from %s (epoch %d, step %d, written by %d rank(s))",
                    os.path.join(directory, info.name), info.epoch, info.step, info.ranks)
    return info


def _skipped_steps(optimizer: Any) -> int:
    """DHO2's count of skipped (non-finite) steps so far; 0 for another optimizer."""
    skipped = getattr(getattr(optimizer, "state", None), "skipped", None)
    return int(skipped.numpy()) if skipped is not None else 0


def epoch_is_good(loss: Any, skipped: int, steps: int, max_skipped_fraction: float) -> bool:
    """Whether an epoch's checkpoint is good.

    Math: good ⇔ loss is finite ∧ skipped ≤ max_skipped_fraction · steps.
    """
    finite = loss is None or math.isfinite(float(loss))
    return finite and skipped <= max_skipped_fraction * max(steps, 1)


class EpochCheckpoint(tf.keras.callbacks.Callback):
    """Commit a checkpoint at the end of every epoch; optionally restore when training starts.

    Put it after the callbacks that broadcast the initial state (``CurvatureRefresh``,
    ``BroadcastInitialState``) and after the ones that synchronise the replicas at the epoch end,
    so the restored state is not overwritten and the saved one is the evaluated one. Pass
    ``initial_epoch=restored epoch`` to ``fit`` (see :func:`check_checkpoint_dir`). Rank 0 holds
    the directory's lock (:mod:`~dho2_tf.training.checkpoint_lock`) from ``on_train_begin`` to
    ``on_train_end``.

    Args:
        directory: checkpoint folder.
        comm: communicator.
        resume: restore a checkpoint in ``on_train_begin`` (the newest good one, or
            ``resume_from``).
        overwrite: allow replacing a checkpoint already in ``directory`` without resuming it;
            otherwise ``on_train_begin`` refuses (:func:`check_checkpoint_dir`).
        run_config: the run's configuration, recorded in every manifest.
        keep: newest checkpoints kept (the newest good one is kept in addition).
        max_skipped_fraction: an epoch with more than this fraction of its steps skipped
            (or a non-finite loss) writes a checkpoint marked bad.
        resume_from: the folder name of the checkpoint to resume instead of the newest good.
    """

    def __init__(self, directory: str | os.PathLike[str], comm: Communicator,
                 resume: bool = False, overwrite: bool = False,
                 run_config: dict[str, Any] | None = None, keep: int = 2,
                 max_skipped_fraction: float = 0.5, resume_from: str | None = None) -> None:
        super().__init__()
        self.directory = os.fspath(directory)
        self.comm = comm
        self.resume = resume
        self.overwrite = overwrite
        self.run_config = run_config
        self.keep = check_int("keep", keep, minimum=1)
        self.max_skipped_fraction = check_real("max_skipped_fraction", max_skipped_fraction,
                                               minimum=0.0, maximum=1.0)
        self.resume_from = resume_from
        self.restored: CheckpointInfo | None = None
        self._fresh = overwrite
        self._epoch_start = (0, 0)

    def on_train_begin(self, logs: dict | None = None) -> None:
        target = check_checkpoint_dir(self.directory, resume=self.resume,
                                      overwrite=self.overwrite, resume_from=self.resume_from)
        if self.comm.is_root:
            acquire_lock(self.directory)
        if self.resume and target is not None:
            self.restored = restore_checkpoint(self.directory, self.model,
                                               self.model.optimizer, self.comm, target)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        optimizer = self.model.optimizer
        self._epoch_start = (_skipped_steps(optimizer), int(optimizer.iterations.numpy()))

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        optimizer = self.model.optimizer
        skipped = _skipped_steps(optimizer) - self._epoch_start[0]
        steps = self.params.get("steps") or (int(optimizer.iterations.numpy())
                                             - self._epoch_start[1])
        logs = logs or {}   # the full training-set loss of the saved weights when measured
        good = epoch_is_good(logs.get("train_loss", logs.get("loss")), skipped, steps or 0,
                             self.max_skipped_fraction)
        save_checkpoint(self.directory, self.model, optimizer, self.comm, epoch=epoch + 1,
                        run_config=self.run_config, keep=self.keep, good=good,
                        fresh=self._fresh)
        self._fresh = False

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.comm.is_root:
            release_lock(self.directory)
