"""Moving DHO2's state between ranks, layouts and runs: export, import, initial broadcast.

An exported state holds every optimizer variable by name, with the parameter-sized ones (base
slots, m₀, V) gathered to full length, so it does not depend on the number of ranks or on the
``sharded``/``replicated`` layout; importing cuts this rank's shard out of it again.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from dho2_tf.distributed.comm import Communicator, Group
from dho2_tf.distributed.sharding import ShardLayout


def _as_rows(value: tf.Tensor) -> tf.Tensor:
    """[s] → [1, s]; [K, s] unchanged (the vectors are sharded along their last axis)."""
    return value if len(value.shape) == 2 else value[None, :]


def export_state(variables: list[tf.Variable], sharded: set[int], n: int, comm: Communicator,
                 group: Group | None, mode: str | None) -> dict[str, Any]:
    """Every variable's value by name; those whose ``id`` is in ``sharded`` all-gathered over
    ``group`` to length n. Adds ``__world_size__`` and ``__mode__``. Collective over ``group``.
    """
    from dho2_tf.curvature.spectrum import gather_vectors

    out: dict[str, Any] = {"__world_size__": comm.size, "__mode__": mode}
    for i, var in enumerate(variables):
        value = var.value()
        if id(var) in sharded:
            full = gather_vectors(_as_rows(value), n, comm, process_set=group,
                                  name=f"dho2/export/{i}")
            value = full if len(value.shape) == 2 else full[0]
        out[var.name] = value.numpy()
    return out


def import_state(variables: list[tf.Variable], sharded: set[int], layout: ShardLayout,
                 state: dict[str, Any], defaults: dict[str, tf.Tensor]) -> None:
    """Assign each variable its value in ``state`` (``defaults`` for names an older export
    lacks), cutting this rank's columns [start, stop) of the padded vector for the sharded ones.

    Raises:
        ValueError: when ``state`` lacks a variable that has no default.
    """
    for var in variables:
        if var.name not in state and var.name not in defaults:
            raise ValueError(f"Checkpoint state lacks optimizer variable {var.name!r}.")
        value = tf.convert_to_tensor(state.get(var.name, defaults.get(var.name)), var.dtype)
        if id(var) in sharded:
            padded = tf.pad(_as_rows(value), [[0, 0], [0, layout.padded_size - layout.n]])
            value = padded[:, layout.start:layout.stop]
            value = value if len(var.shape) == 2 else value[0]
        var.assign(value)


def export_optimizer_state(opt: Any) -> dict[str, Any]:
    """:func:`export_state` of a built :class:`dho2_tf.DHO2`: its variables, the parameter-sized
    ones gathered over the mode's group, and its resolved mode."""
    return export_state(opt.variables, sharded_ids(opt), opt.spec.n, opt.comm,
                        opt.distribution.group, opt.resolved_mode)


def import_optimizer_state(opt: Any, state: dict[str, Any]) -> None:
    """:func:`import_state` into a built :class:`dho2_tf.DHO2`, after checking that its mode can
    load a state of ``state["__mode__"]`` written by ``state["__world_size__"]`` ranks.

    Raises:
        ValueError: on a mode mismatch, or a rank-local state from another world size.
    """
    mode = opt.distribution
    if not mode.can_import(state.get("__mode__")):
        raise ValueError(f"Checkpoint state is for mode={state.get('__mode__')!r}, this "
                         f"optimizer has mode={opt.resolved_mode!r}.")
    mode.check_import_world(state.get("__world_size__"))
    import_state(opt.variables, sharded_ids(opt), opt.layout, state,
                 opt.state.coordinate_defaults())


def sharded_ids(opt: Any) -> set[int]:
    """``id`` of the optimizer's variables that its mode shards (none when it does not)."""
    return {id(v) for v in opt.state.parameter_sized} if opt.distribution.shards_state \
        else set()


def broadcast_weights(variables: list[tf.Variable], comm: Communicator, group: Group | None,
                      root: int = 0) -> None:
    """Copy every variable from rank ``root`` of ``group`` to its other members (a no-op on a
    rank outside ``group`` or when the group has one member)."""
    if comm.group_size(group) == 1 or (group is not None and not group.includes(comm.rank)):
        return
    for i, var in enumerate(variables):
        var.assign(comm.broadcast(var.value(), root, name=f"dho2/broadcast/{i}",
                                  process_set=group))


def average_variables(variables: list[tf.Variable], comm: Communicator, name: str,
                      group: Group | None = None) -> None:
    """v ← (1/P)·Σ_q v_q for every variable, over the P members of ``group`` (``None``: all
    ranks), in one grouped allreduce named ``name``; nothing to do for no variables."""
    means = comm.grouped_allreduce([v.value() for v in variables], "mean", name=name,
                                   process_set=group)
    for var, mean in zip(variables, means):
        var.assign(mean)
