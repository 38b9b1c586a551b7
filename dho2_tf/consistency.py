"""Run-level consistency: every rank must agree on the run before the first collective.

Ranks that disagree on, say, the batch size or the number of samples issue different numbers of
collectives and hang; ranks that disagree on the weight decay or a learning rate train silently
wrong. :func:`check_run_consistency` compares a flat *fingerprint* of everything that must agree
with one ``allgather_object`` and, on a mismatch, raises :class:`RunConsistencyError` on every
rank, naming each differing key with each rank's value. :func:`build_fingerprint` makes that
mapping from a run's parts (configuration, world and layout facts, model variables, data hash)
for the optimizer's check, the training experiment (which also records it in checkpoints) and the
elastic trainer.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping, Sequence

_MISSING = "<missing>"


class RunConsistencyError(ValueError):
    """Ranks disagree on the run configuration.

    Attributes:
        differences: ``{key: [value of rank 0, value of rank 1, ...]}`` for each differing key
            (``"<missing>"`` where a rank lacks the key).
    """

    def __init__(self, message: str, differences: Mapping[str, list[Any]]) -> None:
        super().__init__(message)
        self.differences = dict(differences)


def _canonical(value: Any) -> str:
    """JSON text of ``value`` with sorted keys (tuples and lists compare equal)."""
    return json.dumps(value, sort_keys=True, default=repr)


def describe_ranks(values: list[Any]) -> str:
    """``rank 0,2: 16; rank 1: 32`` — ranks grouped by equal value, in rank order."""
    groups: dict[str, list[int]] = {}
    for rank, value in enumerate(values):
        text = value if value is _MISSING else _canonical(value)
        groups.setdefault(text, []).append(rank)
    return "; ".join(f"rank {','.join(map(str, ranks))}: {text}"
                     for text, ranks in groups.items())


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``config`` as a flat fingerprint: nested mappings become ``prefix.key.subkey`` entries.

    Tuples become lists; values JSON cannot hold (numpy scalars aside, which become numbers)
    are replaced by their ``repr`` without memory addresses (``<function f>``).
    """
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_config(value, f"{name}."))
            continue
        if hasattr(value, "item") and getattr(value, "shape", None) == ():
            value = value.item()
        try:
            out[name] = json.loads(json.dumps(value))
        except (TypeError, ValueError):  # memory addresses differ between processes
            out[name] = re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))
    return out


def build_fingerprint(config: Mapping[str, Any], facts: Mapping[str, Any] | None = None,
                      variables: Sequence[Any] | None = None,
                      data_hash: str | None = None) -> dict[str, Any]:
    """A run's fingerprint from its parts: the flat mapping :func:`check_run_consistency`
    compares across ranks and a checkpoint records.

    Keys:

    * ``config`` as :func:`flatten_config` makes it (a nested mapping ``{"optimizer": {"k": 2}}``
      gives ``optimizer.k``);
    * every entry of ``facts`` (the world and layout: ``ranks``, ``global_batch``,
      ``steps_per_epoch``, ...), made JSON values the same way;
    * with ``variables`` (the model's trainable variables): ``num_trainable_variables``, their
      number, and ``variable[i]``, ``[shape, dtype name]`` of the i-th;
    * with ``data_hash``: ``training_data``, the content hash of the training data.

    Raises:
        ValueError: when a key of ``facts`` (or a derived key) is also a key of ``config``.
    """
    fingerprint = flatten_config(config)
    derived = flatten_config(dict(facts or {}))
    if variables is not None:
        derived["num_trainable_variables"] = len(variables)
        derived.update({f"variable[{i}]": [list(v.shape), v.dtype.name]
                        for i, v in enumerate(variables)})
    if data_hash is not None:
        derived["training_data"] = data_hash
    clashes = sorted(set(fingerprint) & set(derived))
    if clashes:
        raise ValueError(f"`facts` must not repeat configuration keys. Received: {clashes} "
                         "in both")
    fingerprint.update(derived)
    return fingerprint


def find_differences(fingerprints: list[Mapping[str, Any]],
                     optional: tuple[str, ...] = ()) -> dict[str, list[Any]]:
    """Keys whose values are not identical on every rank, with each rank's value.

    Values are compared by their canonical JSON text; a key absent on some rank counts as
    different there (its value is reported as ``"<missing>"``), unless it starts with one of
    the ``optional`` prefixes: those are compared among the ranks that have them.
    """
    keys = sorted({key for fp in fingerprints for key in fp})
    out: dict[str, list[Any]] = {}
    for key in keys:
        values = [fp.get(key, _MISSING) for fp in fingerprints]
        texts = {v if v is _MISSING else _canonical(v) for v in values
                 if not (v is _MISSING and key.startswith(optional))}
        if len(texts) > 1:
            out[key] = values
    return out


def format_differences(what: str, differences: Mapping[str, list[Any]]) -> str:
    """The error message: a first line naming the keys, then one line per key."""
    lines = [f"{what} ranks disagree on {', '.join(differences)} "
             f"(every rank must use the same value):"]
    lines += [f"  {key}: {describe_ranks(values)}" for key, values in differences.items()]
    return "\n".join(lines)


def _json_values(name: str, mapping: Mapping[str, Any]) -> dict[str, Any]:
    """``mapping`` with its values round-tripped through JSON; TypeError when it is not a flat
    mapping of JSON-serialisable values (``name`` is the argument named in the message)."""
    if not isinstance(mapping, Mapping):
        raise TypeError(f"`{name}` must be a mapping. Received: {type(mapping)}")
    out = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            raise TypeError(f"`{name}` must be flat; key {key!r} holds a mapping.")
        try:
            out[str(key)] = json.loads(json.dumps(value))
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name} value of {key!r} is not JSON-serialisable: "
                            f"{value!r} ({err})") from None
    return out


def check_run_consistency(comm, fingerprint: Mapping[str, Any], what: str = "run",
                          optional: tuple[str, ...] = (),
                          context: Mapping[str, Any] | None = None) -> None:
    """Compare ``fingerprint`` across every rank of ``comm``; raise on any difference.

    Collective: every rank must call it, before any other collective whose shape or count
    depends on the fingerprint (one ``allgather_object``). In a single process it does nothing.

    Args:
        comm: a :class:`dho2_tf.distributed.Communicator`.
        fingerprint: flat ``{key: value}``; values must be JSON-serialisable (numbers, strings,
            booleans, ``None`` and lists of those).
        what: what is being compared (``"run"``, ``"DHO2"``, ...), used in the message and in
            the collective's name.
        optional: key prefixes that only some ranks report (compared among those).
        context: flat ``{key: value}`` sent along with ``fingerprint`` and never a difference
            by itself: when a key of ``fingerprint`` differs, the context keys that differ too
            are named in the message (the settings the differing values were derived from).
            Every rank must pass a context (possibly empty) or every rank ``None``: it changes
            what the collective gathers.

    Raises:
        TypeError: when ``fingerprint`` or ``context`` is not a flat mapping of
            JSON-serialisable values (raised before the collective, so on the rank that
            passed it).
        RunConsistencyError: on every rank when any key differs; the message names each
            differing key and every rank's value for it.
    """
    mine = _json_values("fingerprint", fingerprint)
    around = None if context is None else _json_values("context", context)
    if comm.size <= 1:
        return
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", what)
    if around is not None:
        pairs = comm.allgather_object([mine, around], name=f"dho2/consistency/{tag}")
        everyone, contexts = [pair[0] for pair in pairs], [pair[1] for pair in pairs]
    else:  # without context the payload is the fingerprint alone
        everyone = comm.allgather_object(mine, name=f"dho2/consistency/{tag}")
        contexts = [{} for _ in everyone]
    differences = find_differences(everyone, optional)
    if differences:
        differences.update(find_differences(contexts))
        raise RunConsistencyError(format_differences(what, differences), differences)


def verify_optimizer_consistency(comm, config: Mapping[str, Any], mode: str | None,
                                 model: Any, fit: Mapping[str, Any] | None = None) -> None:
    """Compare an optimizer's configuration (``name`` aside), resolved mode, world size, the
    model's trainable variables (shape, dtype) and ``fit``'s parameters (``fit.steps`` per
    epoch and ``fit.epochs``: ranks with another batch size or data size issue another number
    of steps; only the ranks that call ``fit`` report them: pipelined curvature ranks do not)
    across ranks.

    Every rank must call it (one ``allgather_object``); a mismatch raises the same
    :class:`RunConsistencyError` (a ValueError) on every rank, naming each differing key
    (``optimizer.k``, ``variable[0]``, ...) with each rank's value.
    """
    parts = {"optimizer": {k: v for k, v in config.items() if k != "name"}}
    if fit is not None:
        parts["fit"] = dict(fit)
    fingerprint = build_fingerprint(parts, {"mode": mode, "world_size": comm.size},
                                    model.trainable_variables)
    check_run_consistency(comm, fingerprint, what="DHO2", optional=("fit.",))
